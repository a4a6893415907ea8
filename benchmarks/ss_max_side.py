"""Selective search at real photo sizes: cost and recall against ``proposals.max_side``.

    python -m benchmarks.ss_max_side [--images DIR] [--sides full,500,400,300] [--workers 2]

On the COCO photos of ../shared/data/coco-mini (train and val, 159 photos; or a
COCO folder given with --images), runs the proposals stage's search for each
``max_side`` (images with a longer side are searched downscaled, boxes scaled
back) and reports CPU seconds per image and recall@0.5 / @0.7 with at most 2000
boxes, measured against the full-size ground truth (non-crowd objects). The
settings are interleaved over repeats (A/B/A/B) so a busy moment does not favour
one. Writes benchmarks/ss_max_side.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import REPO

COCO_MINI = REPO.parent / "shared" / "data" / "coco-mini"


def _splits(root: Path) -> list[tuple[dict, Path]]:
    from rcnnops.data.io import read_json

    out = []
    for ann in sorted((root / "annotations").glob("instances_*.json")):
        split = ann.stem.removeprefix("instances_")
        out.append((read_json(ann), root / split))
    return out


def _gt(coco: dict) -> dict[int, torch.Tensor]:
    boxes: dict[int, list] = {im["id"]: [] for im in coco["images"]}
    for a in coco["annotations"]:
        if not a.get("iscrowd", 0):
            x, y, w, h = a["bbox"]
            boxes[a["image_id"]].append([x, y, x + w, y + h])
    return {i: torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for i, b in boxes.items()}


def measure(root: Path, sides: list[int | None], workers: int, repeats: int) -> list[dict]:
    from rcnnops.proposals.precompute import SearchSettings, compute_split, search_pool
    from rcnnops.proposals.recall import recall_report

    splits = _splits(root)
    n = sum(len(c["images"]) for c, _ in splits)
    seconds: dict = {s: [] for s in sides}
    recalls: dict = {}
    with search_pool(workers) as pool:
        list(pool.map(time.sleep, [0.5] * workers))  # start every worker
        for r in range(repeats):
            for side in sides if r % 2 == 0 else list(reversed(sides)):
                settings = SearchSettings(max_side=side)
                t0, pairs = time.perf_counter(), []
                for coco, images in splits:
                    ids, boxes, _ = compute_split(coco, images, settings, workers, pool=pool)
                    gt = _gt(coco)
                    pairs += [(gt[i], torch.from_numpy(b)) for i, b in zip(ids, boxes, strict=True)]
                seconds[side].append(time.perf_counter() - t0)
                recalls[side] = recall_report(pairs, top_k=(2000,), ious=(0.5, 0.7))
    rows = []
    for side in sides:
        wall = statistics.median(seconds[side])
        rows.append(
            {
                "max_side": "full" if side is None else side,
                "s/img (CPU)": wall * workers / n,
                "wall s": wall,
                "spread s": max(seconds[side]) - min(seconds[side]),
                "recall@0.5/2000": recalls[side]["recall@0.5/2000"],
                "recall@0.7/2000": recalls[side]["recall@0.7/2000"],
                "objects": recalls[side]["objects"],
                "images": n,
            }
        )
    return rows


def markdown(rows: list[dict], note: str) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + note + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ss_max_side", description=__doc__)
    ap.add_argument("--images", type=Path, default=COCO_MINI, help="a COCO folder")
    ap.add_argument("--sides", default="full,500,400,300", help="max_side values to compare")
    ap.add_argument("--workers", type=int, default=2, help="search processes (default: 2)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats (default: 2)")
    args = ap.parse_args(argv)
    sides = [None if s == "full" else int(s) for s in args.sides.split(",")]
    rows = measure(args.images, sides, args.workers, args.repeats)
    note = (
        f"{args.images.name}: mode fast, {args.workers} worker processes, median of "
        f"{args.repeats} interleaved repeats; s/img (CPU) = wall x workers / images."
    )
    text = markdown(rows, note)
    print(text)
    (REPO / "benchmarks" / "ss_max_side.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
