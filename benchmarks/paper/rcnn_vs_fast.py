"""1. R-CNN vs Fast R-CNN at test time, VGG16, 2000 selective-search proposals.

R-CNN warps every proposal to 227 px (16 px of context) and runs VGG16 on it;
Fast R-CNN runs VGG16's convolutions once on the 600 px image and RoI-pools the
2000 proposals (7x7) into fc6/fc7. R-CNN's cost per crop is constant, so it is
timed on two fixed samples of crops per photo (16 and 48) and the line through
them is taken to 2000 crops: fixed cost + 2000 x cost per crop.
"""

from __future__ import annotations

import statistics

import torch

from benchmarks.common import ab
from benchmarks.paper.common import (
    PASCAL_CLASSES,
    PROPOSALS,
    VGG16_FAST_RCNN,
    VGG16_RCNN,
    Ctx,
    cached_proposals,
    fixed,
    iqr,
    load,
    ms,
    seeded,
    spread,
)

SAMPLES = (16, 48)


def run(ctx: Ctx) -> dict:
    from rcnnops.models import build_model

    fast = seeded(build_model, "fast_rcnn", PASCAL_CLASSES, VGG16_FAST_RCNN).eval()
    rcnn = seeded(build_model, "rcnn", PASCAL_CLASSES, VGG16_RCNN).eval()
    found = [len(cached_proposals(ctx, p)) for p in ctx.images]
    photos = [(load(p), fixed(cached_proposals(ctx, p))) for p in ctx.images]

    def detect(model, n):
        def f(photo):
            image, boxes = photo
            with torch.inference_mode():
                model([image], proposals=[boxes[:n]])

        return f

    cases = {"fast_rcnn": detect(fast, PROPOSALS)}
    cases |= {f"rcnn {n} crops": detect(rcnn, n) for n in SAMPLES}
    times = ab(cases, photos)
    a, b = SAMPLES
    per_crop = [
        (tb - ta) / (b - a)
        for ta, tb in zip(times[f"rcnn {a} crops"], times[f"rcnn {b} crops"], strict=True)
    ]
    rcnn_full = [
        ta + (PROPOSALS - a) * c for ta, c in zip(times[f"rcnn {a} crops"], per_crop, strict=True)
    ]
    ratios = [r / f for r, f in zip(rcnn_full, times["fast_rcnn"], strict=True)]
    ratio = statistics.median(ratios)
    rows = [
        {
            "model": "R-CNN (VGG16, 227 px warps)",
            "s/img": ms(rcnn_full) / 1000,
            "spread s": spread(rcnn_full, 1.0, 1),
            "how": f"{a} and {b} crops timed, scaled to {PROPOSALS} "
            f"({1000 * statistics.median(per_crop):.0f} ms/crop)",
        },
        {
            "model": "Fast R-CNN (VGG16, 600 px, RoIPool 7x7)",
            "s/img": ms(times["fast_rcnn"]) / 1000,
            "spread s": spread(times["fast_rcnn"], 1.0, 1),
            "how": f"{PROPOSALS} proposals, timed whole",
        },
        {
            "model": "R-CNN / Fast R-CNN",
            "s/img": ratio,
            "spread s": f"IQR {iqr(ratios, 0)}",
            "how": "per photo, median",
        },
    ]
    return {
        "title": "1. R-CNN vs Fast R-CNN, VGG16, 2000 proposals per image",
        "paper": "Fast R-CNN (ICCV 2015), table 4: 47.0 s vs 0.32 s per image on a K40 "
        "(146x; 213x with truncated SVD)",
        "columns": list(rows[0]),
        "rows": rows,
        "targets": [
            {
                "name": "R-CNN / Fast R-CNN test time per image, VGG16, 2000 proposals",
                "value": ratio,
                "unit": "x",
                "target": "146x (paper, K40 GPU)",
                "holds": None,
            }
        ],
        "notes": [
            f"{len(photos) - 1} timed photos (one warm-up); selective search (fast, "
            f"max_side 640) found {min(found)}-{max(found)} boxes per photo, cycled up to "
            f"{PROPOSALS} so every photo costs the same work",
            "R-CNN's time is extrapolated linearly from two crop samples per photo "
            "(its cost per crop is constant); Fast R-CNN's is measured whole",
            "VGG16 body from torchvision's vgg16 (weights=None); R-CNN's crop network "
            "ends in global average pooling + one FC instead of fc6/fc7 (0.7 % of its "
            "multiply-adds per crop)",
        ],
    }
