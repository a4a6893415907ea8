"""9. Tracking overhead: time spent in MLflow logging during training, as a
share of the training time.

Faster R-CNN trains on part of the bench project's training split with
``train.fit`` (the training loop of ``rcnnops train``) inside a real MLflow
run on a SQLite store; every logging call is timed.
"""

from __future__ import annotations

import os

import torch

from benchmarks.common import Context, load_params, now, val_dataset


def run(ctx: Context) -> dict:
    import statistics

    from torch.utils.data import Subset

    from rcnnops import tracking
    from rcnnops.checkpoints import Checkpoints
    from rcnnops.data.transforms import RandomHorizontalFlip
    from rcnnops.engine import fit
    from rcnnops.models import build_model
    from rcnnops.solver import FitConfig
    from rcnnops.tracking import metric_logger

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{ctx.work / 'tracking-bench.db'}"
    params = load_params(ctx.project)
    vp = params.variant("faster_rcnn")
    dataset, _, labels = val_dataset(ctx.project, train=True)
    dataset.transform = RandomHorizontalFlip(vp.hflip)
    subset = Subset(dataset, range(min(len(dataset), ctx.pick(120, 320))))
    torch.manual_seed(0)
    model = build_model("faster_rcnn", labels.num_classes + 1, vp.model)
    cfg = FitConfig(
        epochs=1,
        batch_size=vp.batch_size,
        lr=vp.lr,
        warmup_iters=vp.warmup_iters,
        log_every=params.train.log_every,
    )
    calls: list[float] = []
    logged = 0

    inner = metric_logger({})  # what `rcnnops train` logs with

    def log(metrics: dict[str, float], step: int | None = None) -> None:
        nonlocal logged
        t0 = now()
        inner(metrics, step)
        calls.append(now() - t0)
        logged += len(metrics)

    ckpt = Checkpoints(ctx.work / "tracking-bench-ckpt")
    ckpt.clear()
    with tracking.stage_run("rcnnops-bench", "tracking-overhead"):
        t0 = now()
        fit(model, subset, cfg, ckpt, "bench", torch.device("cpu"), log=log, progress=False)
        total = now() - t0
    steps = -(-len(subset) // vp.batch_size)
    in_log = sum(calls)
    share = in_log / total
    step_ms = 1000 * (total - in_log) / steps
    epoch_end = calls[-1]  # the epoch's means
    per_step = statistics.median(calls[:-1]) if len(calls) > 1 else 0.0
    every = per_step / (step_ms / 1000)  # if every step were logged
    amortised = every / params.train.log_every
    rows = [
        {"measure": "training steps (one epoch)", "value": steps},
        {"measure": "training time s", "value": total},
        {"measure": "logging calls (batched metrics)", "value": len(calls)},
        {"measure": "metric values logged", "value": logged},
        {"measure": "median ms per per-step logging call", "value": 1000 * per_step},
        {
            "measure": "ms logging the epoch's means",
            "value": 1000 * epoch_end,
        },
        {"measure": "ms per training step (without logging)", "value": step_ms},
        {
            "measure": "per-step logging, share of step time "
            f"(every {params.train.log_every} steps) %",
            "value": 100 * amortised,
        },
        {
            "measure": "per-step logging, share of step time, if every step were logged %",
            "value": 100 * every,
        },
        {"measure": "all logging, share of this epoch's training time %", "value": 100 * share},
    ]
    return {
        "title": "9. Tracking overhead (MLflow, SQLite store)",
        "paper": "-",
        "columns": list(rows[0]),
        "rows": rows,
        "targets": [
            {
                "name": "MLflow logging per training step, share of step time",
                "value": 100 * amortised,
                "unit": "%",
                "target": "<= 1 %",
                "holds": amortised <= 0.01,
            },
            {
                "name": "all MLflow logging, share of a short epoch's training time",
                "value": 100 * share,
                "unit": "%",
                "target": "-",
                "holds": None,
            },
        ],
        "notes": [
            f"train.log_every = {params.train.log_every} steps: one batched call per "
            "logged step (loss terms and lr), synchronous; the first call of a run "
            "creates the metric keys and is slower; checkpoint writes count as training time"
        ],
    }
