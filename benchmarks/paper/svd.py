"""2. Truncated SVD of Fast R-CNN's fc6 / fc7 at the paper's ranks (1024, 256).

The VGG16 Fast R-CNN of row 1 against the same network with fc6 (25088 x 4096)
and fc7 (4096 x 4096) replaced by their rank-1024 and rank-256 truncated SVDs
(``rcnnops.models.roi.compress``, as ``evaluate.svd_rank`` does): the time of the
box head alone on the 2000 pooled RoIs, of the whole detection, and the largest
change in class scores and in boxes on the same RoIs.
"""

from __future__ import annotations

import copy
import statistics

import torch

from benchmarks.common import timed
from benchmarks.paper.common import (
    PASCAL_CLASSES,
    PROPOSALS,
    VGG16_FAST_RCNN,
    Ctx,
    cached_proposals,
    fixed,
    iqr,
    load,
    ms,
    seeded,
    spread,
)

RANKS = (1024, 256)  # fc6, fc7 (Fast R-CNN, section 3.1)


def _energy(layer: torch.nn.Linear, truncated: torch.nn.Sequential) -> float:
    """Share of the weight matrix's squared singular values the rank kept: the
    first factor is S_t V_t^T, whose squared norm is the kept sum of s_i^2."""
    kept = truncated[0].weight.detach().square().sum()
    return float(kept / layer.weight.detach().square().sum())


def run(ctx: Ctx) -> dict:
    from rcnnops.models import build_model
    from rcnnops.models.roi import compress

    full = seeded(build_model, "fast_rcnn", PASCAL_CLASSES, VGG16_FAST_RCNN).eval()
    head = full.roi_heads.box_head
    cut = compress(copy.deepcopy(full), list(RANKS)).eval()
    small = cut.roi_heads.box_head
    energy = [_energy(head.fc6, small.fc6), _energy(head.fc7, small.fc7)]
    photos = [(load(p), fixed(cached_proposals(ctx, p))) for p in ctx.images]

    captured: dict = {}
    full.roi_heads.box_roi_pool.register_forward_hook(
        lambda mod, args, out: captured.update(boxes=args[1][0], pooled=out)
    )

    def detect(model):
        def f(photo):
            image, boxes = photo
            with torch.inference_mode():
                model([image], proposals=[boxes])

        return f

    # Per photo: the whole detection with and without SVD (alternating which goes
    # first), then both heads on the RoIs the photo pooled in the first run.
    times: dict[str, list[float]] = {k: [] for k in ("whole", "whole + SVD", "head", "head + SVD")}
    score_change, box_change = 0.0, 0.0
    for i, photo in enumerate(photos):
        order = [("whole", full), ("whole + SVD", cut)]
        for name, model in order if i % 2 == 0 else order[::-1]:
            t, _ = timed(lambda model=model, photo=photo: detect(model)(photo))
            if i:  # the first photo is a warm-up
                times[name].append(t)
        pooled, rois = captured["pooled"], captured["boxes"]
        outs = {}
        with torch.inference_mode():
            for name, m in (("head", full), ("head + SVD", cut)):
                t, outs[name] = timed(
                    lambda m=m, x=pooled: m.roi_heads.box_predictor(m.roi_heads.box_head(x))
                )
                if i:
                    times[name].append(t)
        (s0, d0), (s1, d1) = outs["head"], outs["head + SVD"]
        coder = full.roi_heads.box_coder
        b0, b1 = coder.decode(d0, [rois]), coder.decode(d1, [rois])
        score_change = max(score_change, float((s0.softmax(-1) - s1.softmax(-1)).abs().max()))
        box_change = max(box_change, float((b0 - b1).abs().max()))
    head_speed = ms(times["head"]) / ms(times["head + SVD"])
    ratios = [a / b for a, b in zip(times["whole"], times["whole + SVD"], strict=True)]
    whole_speed = statistics.median(ratios)
    rows = [
        {
            "part": part,
            "full ms": ms(times[key]),
            "full spread": spread(times[key]),
            "SVD ms": ms(times[f"{key} + SVD"]),
            "SVD spread": spread(times[f"{key} + SVD"]),
            "speedup": speed,
        }
        for part, key, speed in (
            ("box head (fc6, fc7, predictor), 2000 RoIs", "head", head_speed),
            ("whole detection (600 px, 2000 proposals)", "whole", whole_speed),
        )
    ]
    return {
        "title": "2. Truncated SVD, fc6 rank 1024 and fc7 rank 256 (VGG16 Fast R-CNN)",
        "paper": "Fast R-CNN, section 5.3 / figure 2: detection 1.43x faster (320 -> 223 ms "
        "per image), -0.3 mAP (66.9 -> 66.6 on VOC07)",
        "columns": list(rows[0]),
        "rows": rows,
        "targets": [
            {
                "name": "whole detection without / with truncated SVD (fc6 1024, fc7 256)",
                "value": whole_speed,
                "unit": "x",
                "target": "1.43x (paper, K40 GPU)",
                "holds": None,
            },
            {
                "name": "box head without / with truncated SVD (fc6 1024, fc7 256)",
                "value": head_speed,
                "unit": "x",
                "target": "-",
                "holds": None,
            },
            {
                "name": "largest change of a class score by truncated SVD",
                "value": score_change,
                "unit": "",
                "target": "-0.3 mAP (paper, trained weights)",
                "holds": None,
            },
        ],
        "notes": [
            f"{len(photos) - 1} timed photos (one warm-up), {PROPOSALS} proposals each, "
            "interleaved; the heads timed on the RoIs each photo pooled",
            f"largest change on those RoIs: class probability {score_change:.4f}, box "
            f"coordinate {box_change:.2f} px (of the 600 px image); whole-detection "
            f"ratio IQR {iqr(ratios)}",
            f"random weights have a flat spectrum: the ranks keep {100 * energy[0]:.0f} % "
            f"(fc6) and {100 * energy[1]:.0f} % (fc7) of the squared singular values, far "
            "less than a trained VGG16's, so the changes above are an upper bound of what "
            "trained weights see; the speed does not depend on the weights",
        ],
    }
