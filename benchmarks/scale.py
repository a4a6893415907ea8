"""The cost curve: wall time and peak memory of each stage at growing dataset sizes,
the growth fitted, and the cost of COCO train2017 projected.

    python -m benchmarks --scale            # or: make bench-scale
    python -m benchmarks.scale --sizes 400,4000,20000 [--coco DIR] [--no-dask]

For each size N (training images; N/10 validation images) on the generated
shapes, each stage command runs alone in a fresh project: ``generate``,
``prepare``, ``proposals`` (local pool of ``proposals.workers`` processes, the
cache emptied first), ``proposals`` again on a local 2-worker Dask cluster
(``distributed.LocalCluster``, processes, 127.0.0.1), one training epoch of
``faster_rcnn`` (with its end-of-epoch validation) and ``evaluate``. At the middle
size, 5 % more training images are added and ``proposals`` rerun with its cache
(the incremental case). Peak memory is the largest sum of resident memory over
the command's process tree, sampled every 0.1 s. On ``--coco`` (real photos,
default ../shared/data/coco-mini) ``prepare`` and ``proposals`` are timed too,
since selective search costs ~30x more on a photo than on a 128 px shape. The
largest size times generate, prepare and proposals only (one epoch of training
on 20000 images takes ~22 min on 2 cores): training, evaluation and the Dask row
are fitted from the smaller sizes (their memory is per batch, not per dataset).

Writes ``benchmarks/scale.md`` and ``scale.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, command, new_project

COCO_TRAIN2017 = 118_287  # images in COCO train2017
STAGES = (
    "generate",
    "prepare",
    "proposals",
    "proposals (dask, 2 workers)",
    "train 1 epoch",
    "evaluate",
)


def run_measured(project: Path, args: list[str], env_extra: dict | None = None) -> dict:
    """Run ``rcnnops ARGS`` in ``project``: wall seconds and peak tree RSS (MB)."""
    import psutil

    peak = [0]

    def sample(proc) -> None:
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while proc.poll() is None:
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        total += p.memory_info().rss
            except psutil.NoSuchProcess:
                break
            peak[0] = max(peak[0], total)
            time.sleep(0.1)

    took = command(project, *args, env_extra=env_extra, watch=sample)
    return {"seconds": round(took, 2), "peak_mb": round(peak[0] / 2**20)}


def _set(project: Path, assignments: dict) -> None:
    from rcnnops.params_edit import set_params

    set_params(project / "params.yaml", assignments)


def _subset(project: Path, fraction: float) -> str:
    """A training annotation file with the first ``fraction`` of the images; its name."""
    raw = project / "data/raw/shapes/annotations"
    coco = json.loads((raw / "instances_train.json").read_text())
    ids = sorted(im["id"] for im in coco["images"])
    keep = set(ids[: round(len(ids) * fraction)])
    part = dict(
        coco,
        images=[im for im in coco["images"] if im["id"] in keep],
        annotations=[a for a in coco["annotations"] if a["image_id"] in keep],
    )
    (raw / "instances_train_part.json").write_text(json.dumps(part))
    return "annotations/instances_train_part.json"


def measure_size(work: Path, n: int, dask: str | None, incremental: bool, train: bool) -> dict:
    project = new_project(
        work / f"n{n}",
        {
            "generate.num_train": n,
            "generate.num_val": max(n // 10, 10),
            "train.faster_rcnn.epochs": 1,
            "train.faster_rcnn.lr_steps": [],
        },
    )
    row: dict = {"images": n}
    row["generate"] = run_measured(project, ["generate"])
    if incremental:  # first 100/105 of the training images, then all of them
        _set(project, {"data.train.annotations": _subset(project, 100 / 105)})
    row["prepare"] = run_measured(project, ["prepare"])
    row["proposals"] = run_measured(project, ["proposals"])
    if incremental:
        _set(project, {"data.train.annotations": "annotations/instances_train.json"})
        run_measured(project, ["prepare"])
        row["proposals +5 % (cached)"] = run_measured(project, ["proposals"])
        shutil.rmtree(project / "data/proposals-cache")
        row["proposals +5 % (from scratch)"] = run_measured(project, ["proposals"])
    if dask:
        shutil.rmtree(project / "data/proposals-cache")
        row["proposals (dask, 2 workers)"] = run_measured(
            project, ["proposals"], {"DASK_SCHEDULER_ADDRESS": dask}
        )
    if train:
        row["train 1 epoch"] = run_measured(project, ["train", "--variant", "faster_rcnn"])
        row["evaluate"] = run_measured(project, ["evaluate", "--variant", "faster_rcnn"])
    return row


def measure_coco(work: Path, data: Path) -> dict:
    project = new_project(
        work / "coco",
        {
            "data.root": str(data.resolve()),
            "data.train": {
                "annotations": "annotations/instances_train2017.json",
                "images": "train2017",
            },
            "data.val": {"annotations": "annotations/instances_val2017.json", "images": "val2017"},
        },
    )
    n = len(json.loads((data / "annotations/instances_train2017.json").read_text())["images"])
    n += len(json.loads((data / "annotations/instances_val2017.json").read_text())["images"])
    return {
        "images": n,
        "prepare": run_measured(project, ["prepare"]),
        "proposals": run_measured(project, ["proposals"]),
    }


def fit(sizes: list[int], seconds: list[float]) -> dict:
    """Least-squares ``t = a + b N`` and the log-log slope between the last two sizes
    (1.0: linear)."""
    k = len(sizes)
    mx, my = sum(sizes) / k, sum(seconds) / k
    sxx = sum((x - mx) ** 2 for x in sizes)
    b = sum((x - mx) * (y - my) for x, y in zip(sizes, seconds, strict=True)) / sxx
    a = my - b * mx
    slope = math.log(seconds[-1] / seconds[-2]) / math.log(sizes[-1] / sizes[-2])
    return {"fixed_s": a, "s_per_image": b, "growth_exponent": slope}


def report(rows: list[dict], coco: dict | None, workers: list[int]) -> tuple[str, dict]:
    sizes = [r["images"] for r in rows]
    lines = ["# Cost curve (python -m benchmarks --scale)", ""]
    lines += ["| stage | " + " | ".join(f"{n} img: s / peak MB" for n in sizes) + " |"]
    lines += ["|---|" + "---|" * len(sizes)]
    stages = [s for s in STAGES if any(s in r for r in rows)]
    for s in stages:
        cells = [f"{r[s]['seconds']:.1f} / {r[s]['peak_mb']}" if s in r else "-" for r in rows]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| stage | fixed s | ms per image | growth exponent (last two sizes) | "
        "peak MB (last two sizes) |",
        "|---|---|---|---|---|",
    ]
    fits, flat = {}, {}
    for s in stages:
        have = [r for r in rows if s in r]
        if len(have) < 2:
            continue
        f = fits[s] = fit([r["images"] for r in have], [r[s]["seconds"] for r in have])
        m0, m1 = have[-2][s]["peak_mb"], have[-1][s]["peak_mb"]
        flat[s] = m1 <= 1.25 * m0
        lines.append(
            f"| {s} | {f['fixed_s']:.1f} | {1000 * f['s_per_image']:.2f} | "
            f"{f['growth_exponent']:.2f} ({have[-2]['images']} -> {have[-1]['images']}) | "
            f"{m0} -> {m1} ({(m1 / m0 - 1) * 100:+.0f} %) |"
        )
    lines += [
        "",
        "Peak memory of the Dask row is the stage process only: the workers are "
        "the cluster's processes (each holds one image at a time).",
    ]
    inc = [r for r in rows if "proposals +5 % (cached)" in r]
    if inc:
        r = inc[0]
        c = r["proposals +5 % (cached)"]["seconds"]
        f = r["proposals +5 % (from scratch)"]["seconds"]
        lines += [
            "",
            f"Incremental proposals at {r['images']} training images + 5 %: {c:.1f} s with "
            f"the cache vs {f:.1f} s from scratch ({c / f * 100:.0f} %).",
        ]
    projection = {}
    if coco:
        per_img = coco["proposals"]["seconds"] / coco["images"]
        cpu_s = per_img * 2  # the stage ran 2 worker processes on 2 cores
        core_h = cpu_s * COCO_TRAIN2017 / 3600
        projection = {
            "coco_s_per_image_wall": per_img,
            "coco_cpu_s_per_image": cpu_s,
            "train2017_proposals_core_hours": core_h,
            "train2017_hours_on_workers": {w: core_h / w for w in workers},
        }
        on_workers = ", ".join(f"{w}: {core_h / w:.1f} h" for w in workers)
        lines += [
            "",
            f"Real photos ({coco['images']} coco-mini photos): prepare "
            f"{coco['prepare']['seconds']:.1f} s, proposals {coco['proposals']['seconds']:.1f} s"
            f" ({per_img:.2f} s per photo on 2 workers = {cpu_s:.2f} CPU s per photo; peak "
            f"{coco['proposals']['peak_mb']} MB).",
            "",
            f"Projected selective search for COCO train2017 ({COCO_TRAIN2017} photos): "
            f"{core_h:.0f} core-hours; wall time on N single-core Dask workers (images are "
            f"independent, so linear scaling is assumed): {on_workers}.",
        ]
    if fits:
        projected = ", ".join(
            f"{s} {(f['fixed_s'] + f['s_per_image'] * COCO_TRAIN2017) / 3600:.2f} h"
            for s, f in fits.items()
        )
        lines += ["", f"Generated-data stages projected to 118k images (linear fit): {projected}."]
    doc = {"rows": rows, "coco": coco, "fits": fits, "memory_flat": flat, "projection": projection}
    return "\n".join(lines) + "\n", doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--sizes", default="400,4000,20000", help="training images per size")
    ap.add_argument(
        "--coco",
        type=lambda v: Path(v) if v else None,
        default=REPO.parent / "shared/data/coco-mini",
        help="real photos (COCO layout) to time prepare and proposals on; '' to skip",
    )
    ap.add_argument("--no-dask", action="store_true", help="skip the Dask cluster rows")
    ap.add_argument("--work", type=Path, default=REPO / "benchmarks/.work/scale")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    started = time.perf_counter()
    rows, coco = [], None
    cluster = None
    if not args.no_dask:
        from distributed import LocalCluster

        cluster = LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        )
    try:
        for i, n in enumerate(sizes):
            print(f"[scale] {n} images ...", flush=True)
            # The largest size times the data stages only (its training epoch alone would
            # take ~22 min here): train, evaluate and the Dask row are fitted from the others.
            largest = i == len(sizes) - 1 and len(sizes) > 2
            dask = cluster.scheduler_address if cluster and not largest else None
            rows.append(
                measure_size(
                    args.work, n, dask, incremental=i == len(sizes) // 2, train=not largest
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if cluster is not None:
            cluster.close()
    if args.coco and args.coco.is_dir():
        print("[scale] coco ...", flush=True)
        coco = measure_coco(args.work, args.coco)
    text, doc = report(rows, coco, [1, 2, 8, 32, 128])
    doc["minutes"] = (time.perf_counter() - started) / 60
    text += f"\n_{doc['minutes']:.1f} min on this machine._\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.md").write_text(text)
    (args.out / "scale.json").write_text(json.dumps(doc, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
