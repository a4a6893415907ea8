"""3. Selective search, fast vs quality, at ``proposals.max_side`` on real photos.

Both of the paper's strategies on the same photos, interleaved per photo, one
thread each (as the proposals stage's workers run it), at params.yaml's
``max_side`` (longer sides above it searched downscaled, boxes scaled back):
seconds per image, boxes per image, and recall
of the full-size ground-truth boxes at IoU 0.5 and 0.7 with at most 2000 boxes.
"""

from __future__ import annotations

import json
import statistics

import torch

from benchmarks.common import timed
from benchmarks.paper.common import MAX_SIDE, PROPOSALS, Ctx, search, spread

CASES = (("fast", MAX_SIDE), ("quality", MAX_SIDE))


def _ground_truth(ctx: Ctx) -> dict[str, torch.Tensor] | None:
    if ctx.annotations is None:
        return None
    coco = json.loads(ctx.annotations.read_text())
    names = {im["id"]: im["file_name"] for im in coco["images"]}
    boxes: dict[str, list] = {name: [] for name in names.values()}
    for a in coco["annotations"]:
        if not a.get("iscrowd", 0):
            x, y, w, h = a["bbox"]
            boxes[names[a["image_id"]]].append([x, y, x + w, y + h])
    return {k: torch.tensor(v, dtype=torch.float32).reshape(-1, 4) for k, v in boxes.items()}


def run(ctx: Ctx) -> dict:
    from rcnnops.proposals.recall import recall_report

    gt = _ground_truth(ctx)
    seconds: dict = {c: [] for c in CASES}
    counts: dict = {c: [] for c in CASES}
    pairs: dict = {c: [] for c in CASES}
    photos = list(ctx.search_images)
    for i, path in enumerate(photos):
        for case in CASES if i % 2 == 0 else CASES[::-1]:  # A/B/B/A: no case always first
            t, boxes = timed(lambda case=case, path=path: search(path, *case))
            seconds[case].append(t)
            counts[case].append(len(boxes))
            if gt is not None:
                pairs[case].append((gt[path.name], torch.from_numpy(boxes)))
    rows = []
    for case in CASES:
        mode, side = case
        recall = recall_report(pairs[case], top_k=(PROPOSALS,), ious=(0.5, 0.7)) if gt else {}
        rows.append(
            {
                "mode": mode,
                "max_side": side or "full",
                "s/img": statistics.median(seconds[case]),
                "spread s": spread(seconds[case], 1.0, 2),
                "boxes/img": statistics.median(counts[case]),
                "recall@0.5/2000": recall.get(f"recall@0.5/{PROPOSALS}"),
                "recall@0.7/2000": recall.get(f"recall@0.7/{PROPOSALS}"),
            }
        )
    fast = rows[0]["s/img"]
    objects = sum(len(g) for g, _ in pairs[CASES[0]])
    return {
        "title": f"3. Selective search fast vs quality at max_side {MAX_SIDE}",
        "paper": "Uijlings et al. / Fast R-CNN: fast mode about 2 s per PASCAL image "
        "(~500x375) on a CPU core, quality about 5x slower with higher recall",
        "columns": list(rows[0]),
        "rows": rows,
        "targets": [
            {
                "name": f"selective search fast mode s/img at max_side {MAX_SIDE}, one core",
                "value": fast,
                "unit": "s",
                "target": "about 2 s (paper)",
                "holds": fast <= 2.5,
            },
            {
                "name": "selective search quality / fast time",
                "value": rows[1]["s/img"] / fast,
                "unit": "x",
                "target": "-",
                "holds": None,
            },
        ],
        "notes": [
            f"{len(photos)} photos, every one timed (no warm-up: each search is its own "
            f"OpenCV call); one thread; recall against {objects} full-size non-crowd "
            "ground-truth boxes"
            + ("" if gt else " (no annotations for these photos: recall not measured)"),
        ],
    }
