"""R-CNN vs Fast R-CNN on the same backbone and the same cached proposals.

Prints, in one run (medians over images, cases interleaved A/B/A/B):

- test time per image of R-CNN (warp 32 px, our CPU default, and 227 px, the
  paper's) and Fast R-CNN, and their ratio (the Fast R-CNN paper: 146x, VGG16);
- training time per image of each;
- loading cached proposals vs recomputing them with selective search;
- selective-search throughput with 1 vs 2 worker processes.

Untrained weights: speed does not depend on them. Data: the generated shapes
validation images (default params), written to a temporary folder.

    .venv/bin/python benchmarks/proposal_variants.py [--images 20]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rcnnops.config import DataParams, GenerateParams, PrepareParams, SplitSource
from rcnnops.data.coco import CocoDetection
from rcnnops.data.prepare import load_split, prepare
from rcnnops.data.shapes import generate
from rcnnops.models import build_model
from rcnnops.models.fast_rcnn import compress
from rcnnops.proposals.precompute import (
    ProposalStore,
    SearchSettings,
    compute_split,
    search_pool,
    write_split,
)


def _median_ms(times: list[float]) -> float:
    return 1000.0 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=20, help="validation images to time")
    ap.add_argument("--mode", default="quality", help="selective search mode (fast|quality)")
    ap.add_argument(
        "--project",
        type=Path,
        default=None,
        help="a project where `make run` has trained fast_rcnn: also report the "
        "truncated SVD's effect on its validation AP and speed",
    )
    ap.add_argument("--svd-rank", type=int, default=32, help="rank for the SVD rows")
    args = ap.parse_args()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="rcnnops-bench-"))
    g = dataclasses.replace(
        GenerateParams(), out=str(tmp / "raw"), num_train=8, num_val=args.images
    )
    generate(g)
    prepare(
        DataParams(
            str(tmp / "raw"),
            SplitSource("annotations/instances_train.json", "train"),
            SplitSource("annotations/instances_val.json", "val"),
        ),
        PrepareParams(out=str(tmp / "prepared")),
    )
    coco, root, labels = load_split(tmp / "prepared", "val")
    settings = SearchSettings(mode=args.mode, max_boxes=2000)

    # Selective search: 1 vs 2 workers, both warmed up, then A/B/A/B; then cache.
    with search_pool(2) as pool:
        # Busy jobs make the pool start both workers (it starts them lazily).
        list(pool.map(time.sleep, [2.0, 2.0]))
        compute_split(coco, root, settings, 2, pool=pool)
        ids, boxes, scores = compute_split(coco, root, settings, workers=1)
        ones, twos = [], []
        for _ in range(2):
            t0 = time.perf_counter()
            compute_split(coco, root, settings, workers=1)
            ones.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            compute_split(coco, root, settings, 2, pool=pool)
            twos.append(time.perf_counter() - t0)
    one, two = statistics.median(ones), statistics.median(twos)
    write_split(tmp / "proposals", ids, boxes, scores, settings, "bench")
    t0 = time.perf_counter()
    store = ProposalStore(tmp / "proposals", verify=False)
    loaded = [store.boxes_for(i) for i in ids]
    load = time.perf_counter() - t0
    n_props = statistics.mean(len(b) for b in loaded)

    dataset = CocoDetection(coco, root, labels, proposals=store.boxes_for)
    k = labels.num_classes + 1
    common = {
        "min_size": 128,
        "max_size": 128,
        "representation_size": 256,
        "box_batch_size_per_image": 64,
    }
    models = {
        "fast_rcnn": build_model(
            "fast_rcnn", k, common | {"backbone": "small", "stride": 8, "roi_op": "pool"}
        ),
        "rcnn (warp 32)": build_model("rcnn", k, common | {"warp_size": 32, "context": 2}),
        "rcnn (warp 227)": build_model(
            "rcnn", k, common | {"warp_size": 227, "context": 16, "crop_chunk": 64}
        ),
    }
    # The Fast R-CNN paper's truncated SVD of the FC layers (section 3.1), test time only.
    svd = copy.deepcopy(models["fast_rcnn"])
    compress(svd, args.svd_rank)
    models = {"fast_rcnn": models["fast_rcnn"], f"fast_rcnn svd{args.svd_rank}": svd} | {
        k: v for k, v in models.items() if k != "fast_rcnn"
    }
    test: dict[str, list[float]] = {name: [] for name in models}
    for m in models.values():
        m.eval()
    with torch.no_grad():
        for i in range(len(dataset)):
            image, target = dataset[i]
            for name, m in models.items():  # interleaved: A/B/C, A/B/C, ...
                t0 = time.perf_counter()
                m([image], proposals=[target["proposals"]])
                test[name].append(time.perf_counter() - t0)
    train: dict[str, list[float]] = {name: [] for name in models}
    for name, m in models.items():
        if name == f"fast_rcnn svd{args.svd_rank}":
            continue  # test-time compression only
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)
        for i in range(0, min(len(dataset), 8), 2):
            batch = [dataset[j] for j in (i, i + 1)]
            images = [b[0] for b in batch]
            targets = [{k: v for k, v in b[1].items() if k != "proposals"} for b in batch]
            props = [b[1]["proposals"] for b in batch]
            t0 = time.perf_counter()
            loss = sum(m(images, targets, props).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            train[name].append((time.perf_counter() - t0) / 2)

    fast = _median_ms(test["fast_rcnn"])
    print(
        f"images: {len(ids)} ({g.image_size}x{g.image_size}), selective search '{args.mode}': "
        f"{n_props:.0f} proposals/image on average"
    )
    print(f"{'model':<18}{'test ms/img':>12}{'vs Fast R-CNN':>15}{'train ms/img':>14}")
    for name in models:
        t = _median_ms(test[name])
        tr = f"{_median_ms(train[name]):>14.1f}" if train[name] else f"{'-':>14}"
        print(f"{name:<18}{t:>12.1f}{t / fast:>14.2f}x{tr}")
    print(
        f"proposals: recompute {1000 * one / len(ids):.1f} ms/img, load cached "
        f"{1000 * load / len(ids):.3f} ms/img: {one / load:.0f}x"
    )
    print(
        f"selective search throughput: 1 worker {len(ids) / one:.1f} img/s, 2 workers "
        f"{len(ids) / two:.1f} img/s: {one / two:.2f}x"
    )
    if args.project is not None:
        svd_on_trained(args.project, args.svd_rank)


def svd_on_trained(project: Path, rank: int) -> None:
    """Validation AP and speed of the project's trained Fast R-CNN, with and
    without truncated SVD of its FC layers (paper: 1.43x faster, -0.3 mAP)."""
    import os

    from rcnnops.config import load_params
    from rcnnops.metrics import coco_evaluate, predict
    from rcnnops.proposals.precompute import open_store
    from rcnnops.train import load_model

    os.chdir(project)
    params = load_params("params.yaml")
    coco, root, labels = load_split(Path(params.prepare.out), "val")
    ds = CocoDetection(coco, root, labels, proposals=open_store(params, "val").boxes_for)
    rows = []
    for r in (None, rank):
        model, _ = load_model(Path(params.train.out) / "fast_rcnn")
        if r is not None:
            compress(model, r)
        res, ms = predict(model, ds, labels, torch.device("cpu"), progress=False)
        stats, _, _ = coco_evaluate(coco, res)
        rows.append((r, stats["bbox_AP"], stats["bbox_AP50"], ms))
    print(f"trained fast_rcnn ({project}), {len(ds)} val images:")
    for r, ap, ap50, ms in rows:
        print(
            f"  {'no SVD' if r is None else f'SVD rank {r}':<12} AP {ap:.4f}  AP50 {ap50:.4f}"
            f"  {ms:.1f} ms/img"
        )


if __name__ == "__main__":
    main()
