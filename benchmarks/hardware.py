"""11. The machine's peak and how much of it training uses, fp32 and bf16.

* GEMM peaks: a square matrix product in fp32 and in bf16 (GFLOP/s, median and
  range of repeats). On a CPU with AMX-BF16 / AVX512-BF16 bf16 runs on matrix
  units; elsewhere PyTorch emulates it, far slower than fp32.
* Each variant's training step (the bench project's params: its batch size,
  image size and proposals): GFLOP counted by ``torch.utils.flop_counter``
  (forward + backward), time per step in fp32 and under bf16 autocast (the
  training loop's own ``Solver`` and ``Precision``), and the share of the peak
  that reaches. fp32 with ``channels_last`` is timed too.
* The pipeline's training throughput (``train_epoch/images_per_s`` that the
  bench project's ``train`` stages logged: data loading and steps, no
  validation) against the isolated step's.

``amp: auto`` picks bf16 only where the CPU flags show bf16 hardware
(:mod:`rcnnops.precision`); the table says what it picks here.
"""

from __future__ import annotations

import statistics
import time

from benchmarks.common import VARIANTS, Context, load_params, val_dataset


def gemm_gflops(dtype, n: int, repeats: int) -> list[float]:
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return rates


def _batches(project, variant: str, params, count: int):
    """The first ``count`` training batches of ``variant`` as the stage builds
    them (its batch size, proposals, masks)."""
    from rcnnops.data.dataset import collate
    from rcnnops.models import MASK_VARIANTS, USES_PROPOSALS

    ds, _, labels = val_dataset(project, proposals=variant in USES_PROPOSALS, train=True)
    ds.masks = variant in MASK_VARIANTS
    size = params.variant(variant).batch_size
    batches = [collate([ds[i * size + j] for j in range(size)]) for i in range(count)]
    return batches, labels


def _step_fn(project, variant: str, precision: str, count: int, channels_last: bool = False):
    """A closure running one full training step (forward, backward, SGD) of a
    fresh model, as the engine does, on the next of ``count`` batches in turn;
    and the batch size."""
    import itertools

    import torch

    from rcnnops.engine import split_proposals
    from rcnnops.models import build_model
    from rcnnops.solver import FitConfig, Solver

    params = load_params(project)
    vp = params.variant(variant)
    batches, labels = _batches(project, variant, params, count)
    torch.manual_seed(0)
    model = build_model(variant, labels.num_classes + 1, vp.model).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    cfg = FitConfig(epochs=1, batch_size=vp.batch_size, lr=1e-4, amp=precision)
    solver = Solver.build(model, cfg, 100, torch.device("cpu"))
    turn = itertools.cycle(batches)

    def step():
        images, targets = next(turn)
        t = [{k: v.clone() for k, v in t.items()} for t in targets]
        proposals = split_proposals(t)
        with solver.precision.autocast():
            losses = model(images, t, proposals) if proposals else model(images, t)
        solver.step(sum(losses.values()), cfg.clip_grad_norm)

    return step, vp.batch_size


def step_gflop(project, variant: str, count: int) -> float:
    """Mean GFLOP of a training step over the ``count`` batches timed."""
    from torch.utils.flop_counter import FlopCounterMode

    step, _ = _step_fn(project, variant, "fp32", count)
    with FlopCounterMode(display=False) as counter:
        for _ in range(count):
            step()
    return counter.get_total_flops() / 1e9 / count


def time_steps(step, repeats: int, count: int) -> list[float]:
    """Seconds of ``repeats`` steps after a warm-up pass over the ``count`` batches."""
    for _ in range(count):
        step()  # warm-up (allocator, kernels), and the same batch order as the flop count
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def pipeline_rates(project) -> dict[str, float]:
    """``train_epoch/images_per_s`` of the newest run of each variant (last epoch)."""
    import os

    import mlflow

    params = load_params(project)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(params.register.experiment)
    rates: dict[str, float] = {}
    if exp is None:
        return rates
    for run in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"]):
        v = run.data.tags.get("variant")
        rate = run.data.metrics.get("train_epoch/images_per_s")
        if v and v not in rates and rate is not None:
            rates[v] = rate
    return rates


def _ms(seconds: list[float]) -> str:
    ms = sorted(1000 * s for s in seconds)
    return f"{statistics.median(ms):.0f} ({ms[0]:.0f}-{ms[-1]:.0f})"


def run(ctx: Context) -> dict:
    import torch

    from rcnnops.precision import cpu_flags, cpu_has_bf16, resolve_amp

    hardware_bf16 = cpu_has_bf16(cpu_flags())
    auto = resolve_amp("auto", torch.device("cpu")).name
    repeats = ctx.pick(6, 12)
    count = repeats  # distinct batches, cycled: every timed step on other images
    # The peak: the best size (cache effects make 2048² no faster than 512² on some
    # CPUs). Emulated bf16 runs at ~1 GFLOP/s: 512² only.
    fp32_peak = max(
        (gemm_gflops(torch.float32, n, repeats) for n in (512, 1024, 2048)),
        key=statistics.median,
    )
    bf16_sizes = (512, 1024, 2048) if hardware_bf16 else (512,)
    bf16_peak = max(
        (gemm_gflops(torch.bfloat16, n, repeats) for n in bf16_sizes), key=statistics.median
    )
    peak32, peak16 = statistics.median(fp32_peak), statistics.median(bf16_peak)
    bf16_steps = repeats if hardware_bf16 else 2  # emulated: a glimpse, not a timing study
    pipeline = pipeline_rates(ctx.project)
    rows = [
        {
            "case": "GEMM peak fp32 / bf16 GFLOP/s",
            "fp32 ms/step": f"{peak32:.0f} ({min(fp32_peak):.0f}-{max(fp32_peak):.0f})",
            "bf16 ms/step": f"{peak16:.1f} ({min(bf16_peak):.1f}-{max(bf16_peak):.1f})",
        }
    ]
    targets = []
    for variant in VARIANTS:
        gflop = step_gflop(ctx.project, variant, count)
        step32, batch = _step_fn(ctx.project, variant, "fp32", count)
        t32 = time_steps(step32, repeats, count)
        step_cl, _ = _step_fn(ctx.project, variant, "fp32", count, channels_last=True)
        tcl = time_steps(step_cl, repeats, count)
        n16 = count if hardware_bf16 else 1
        step16, _ = _step_fn(ctx.project, variant, "bf16", n16)
        t16 = time_steps(step16, bf16_steps, n16)
        m32, m16 = statistics.median(t32), statistics.median(t16)
        speedup = m32 / m16
        rows.append(
            {
                "case": f"{variant} train step (batch {batch})",
                "GFLOP/step": gflop,
                "fp32 ms/step": _ms(t32),
                "fp32 channels_last ms/step": _ms(tcl),
                "bf16 ms/step": _ms(t16),
                "bf16 speedup": speedup,
                "fp32 % of fp32 peak": 100 * gflop / m32 / peak32,
                # Emulated bf16 is no peak: steps also run fp32 parts, the share is meaningless.
                "bf16 % of bf16 peak": 100 * gflop / m16 / peak16 if hardware_bf16 else None,
                "isolated img/s (fp32)": batch / m32,
                "pipeline img/s": pipeline.get(variant),
            }
        )
        if variant in ("faster_rcnn", "mask_rcnn"):
            targets.append(
                {
                    "name": f"{variant} bf16 step speed-up",
                    "value": speedup,
                    "unit": "x",
                    "target": ">= 1.4x (on a CPU with AMX / AVX512-BF16)",
                    "holds": speedup >= 1.4 if hardware_bf16 else None,
                }
            )
    flags = sorted(f for f in cpu_flags() if "bf16" in f or "amx" in f or f == "avx512f")
    return {
        "title": "11. Hardware: peak GEMM rates and training steps in fp32 and bf16",
        "paper": "-",
        "columns": list(rows[1]),
        "rows": rows,
        "targets": targets,
        "notes": [
            f"CPU bf16 hardware: {'yes' if hardware_bf16 else 'no'} (flags: "
            f"{', '.join(flags) or 'none of amx_bf16, avx512_bf16, avx512f'}); "
            f"amp: auto resolves to {auto} here.",
            "The first row holds GEMM rates (GFLOP/s), not step times: median (min-max) at the "
            "fastest of 512², 1024², 2048²"
            + ("." if hardware_bf16 else " for fp32; bf16 at 512² (emulated: too slow above)."),
            f"Step times: median (min-max) of {repeats} steps on {count} different batches, "
            "after a warm-up pass over them"
            + ("" if hardware_bf16 else f"; bf16: {bf16_steps} steps on one batch (emulated)")
            + ". GFLOP by torch.utils.flop_counter (fp32, forward + backward, mean per batch).",
            "pipeline img/s: the bench project's train stage (train_epoch/images_per_s, last "
            "epoch: data loading included, validation excluded).",
        ],
    }
