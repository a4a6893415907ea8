"""[stage] evaluate: predictions on the validation split -> COCO results -> COCOeval.

Outputs (``evaluate.out/<variant>/``): ``metrics.json`` (DVC metrics: the 12
standard COCO numbers as ``bbox_AP``, ``bbox_AP50``..., per-class AP,
``infer_ms_per_image``), ``predictions.json`` (COCO results format, xywh),
``pr_curve.png`` (precision-recall curves). Metrics are also logged to the
MLflow run that trained the model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from rcnnops.metrics import coco_evaluate, predict


def plot_pr(precision: np.ndarray, names: Iterable[str], path: Path, title: str) -> None:
    """Precision-recall curves: mean over classes at IoU .50/.75, and per class at .50."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recall = np.linspace(0, 1, precision.shape[1])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for t, iou in ((0, 0.5), (5, 0.75)):
        p = precision[t, :, :, 0, -1]
        valid = (p > -1).all(axis=0)
        if valid.any():
            axes[0].plot(recall, p[:, valid].mean(axis=1), label=f"IoU={iou:.2f}")
    axes[0].set(
        title=f"{title}: mean over classes",
        xlabel="recall",
        ylabel="precision",
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    axes[0].legend(loc="lower left")
    for k, name in enumerate(names):
        p = precision[0, :, k, 0, -1]
        if (p > -1).all():
            axes[1].plot(recall, p, label=name)
    axes[1].set(title="per class, IoU=0.50", xlabel="recall", xlim=(0, 1), ylim=(0, 1.02))
    if len(axes[1].lines) <= 12:
        axes[1].legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(
    out_dir: Path,
    metrics: dict,
    results: list[dict],
    precision: np.ndarray,
    names: list[str],
    title: str,
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "predictions.json").write_text(json.dumps(results))
    plot_pr(precision, names, out_dir / "pr_curve.png", title)
    # metrics.json last: its presence means the report is complete.
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False))


def summarise(stats: dict, per_class: dict, ms: float) -> dict:
    """The metrics.json document (NaN per-class AP -> null)."""
    return {
        **{k: round(v, 6) for k, v in stats.items()},
        "infer_ms_per_image": round(ms, 3),
        "per_class_AP": {k: (None if math.isnan(v) else round(v, 6)) for k, v in per_class.items()},
    }


def run(params, variant: str, progress: bool = True) -> dict:
    """The stage: evaluate the trained ``variant`` on the prepared validation split."""
    from rcnnops import tracking
    from rcnnops.data.coco import CocoDetection, DataError
    from rcnnops.data.prepare import load_manifest, load_split
    from rcnnops.models import USES_PROPOSALS
    from rcnnops.train import load_model, resolve_device

    prepared = Path(params.prepare.out)
    manifest = load_manifest(prepared)
    val_coco, val_root, labels = load_split(prepared, "val")
    device = resolve_device(params.train.device)
    model_dir = Path(params.train.out) / variant
    model, meta = load_model(model_dir, device)
    if meta["data_hash"] != manifest["data_hash"]:
        raise DataError(
            f"{model_dir / 'model.json'}: the model was trained on other data "
            f"than {prepared}; retrain with `dvc repro train@{variant}`"
        )
    proposals = None
    if variant in USES_PROPOSALS:
        from rcnnops.proposals.precompute import open_store

        proposals = open_store(params, "val").boxes_for
    dataset = CocoDetection(val_coco, val_root, labels, proposals=proposals)
    results, ms = predict(model, dataset, labels, device, params.evaluate.batch_size, progress)
    stats, per_class, precision = coco_evaluate(val_coco, results)
    metrics = summarise(stats, per_class, ms)
    out_dir = Path(params.evaluate.out) / variant
    write_report(out_dir, metrics, results, precision, list(labels.names), variant)
    with tracking.stage_run(params.register.experiment, variant, meta["run_id"]):
        tracking.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float)})
        tracking.log_metrics(
            {f"AP_class/{k}": v for k, v in per_class.items() if not math.isnan(v)}
        )
        tracking.set_tags({"val_hash": manifest["val_hash"]})
        for name in ("metrics.json", "pr_curve.png"):
            tracking.log_artifact(out_dir / name, "evaluation")
    return metrics
