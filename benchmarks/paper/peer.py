"""6. rcnnops vs torchvision's detectors on the same photos with the same weights.

torchvision's ``fasterrcnn_resnet50_fpn``, ``maskrcnn_resnet50_fpn`` and
``fasterrcnn_mobilenet_v3_large_fpn`` (``weights=None``, seeded) against
rcnnops' ``faster_rcnn`` / ``mask_rcnn`` under the parity architectures of
``rcnnops.presets`` (the ``torchvision-reference`` / ``finetune-coco`` networks)
holding the same state dict: inference per photo at 800/1333 (eval mode, the
same detections), and a training iteration (batch 2, fixed targets, SGD step),
interleaved. (This row also timed rcnnops' own single-map RoIAlign, written with
``grid_sample``, against ``torchvision.ops.roi_align`` at the heads' sizes: it was
1.41x / 1.24x slower there and has been removed; rcnnops uses torchvision's op.)
"""

from __future__ import annotations

import statistics

import torch
from torchvision.models import detection as tvd

from benchmarks.common import ab, timed
from benchmarks.paper.common import Ctx, iqr, load, spread

TRAIN_ITERATIONS = 3  # the first a warm-up: R-50-FPN steps take ~30-60 s on 2 CPU cores
LIMIT = 1.05  # rcnnops / torchvision must not exceed this


def _pair(name: str):
    from rcnnops.models import build_model
    from rcnnops.presets import TORCHVISION_DETECTORS

    variant, arch, _ = TORCHVISION_DETECTORS[name]
    torch.manual_seed(0)
    reference = getattr(tvd, name)(weights=None, weights_backbone=None)
    ours = build_model(variant, 91, arch | {"pretrained": None})
    ours.load_state_dict(reference.state_dict())  # strict: the same tensors, all of them
    return reference, ours


def _targets(images: list[torch.Tensor], masks: bool) -> list[dict]:
    """Three fixed objects per image (boxes at fixed fractions of its size)."""
    out = []
    for image in images:
        h, w = image.shape[-2:]
        frac = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.9], [0.2, 0.5, 0.35, 0.8]])
        boxes = frac * torch.tensor([w, h, w, h], dtype=torch.float32)
        t = {"boxes": boxes, "labels": torch.tensor([1, 18, 62])}
        if masks:
            m = torch.zeros((3, h, w), dtype=torch.uint8)
            for k, (x0, y0, x1, y1) in enumerate(boxes.round().int().tolist()):
                m[k, y0:y1, x0:x1] = 1
            t["masks"] = m
        out.append(t)
    return out


def _detector_rows(ctx: Ctx, name: str) -> tuple[list[dict], dict]:
    reference, ours = _pair(name)
    photos = [load(p) for p in ctx.images]
    counts = []

    def infer(model):
        def f(image):
            model.eval()
            with torch.inference_mode():
                counts.append(len(model([image])[0]["boxes"]))

        return f

    inference = ab({"torchvision": infer(reference), "rcnnops": infer(ours)}, photos)
    same = all(a == b for a, b in zip(counts[::2], counts[1::2], strict=True))

    batch = photos[:2]
    targets = _targets(batch, masks="mask" in name)
    optimisers = {
        k: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)
        for k, m in (("torchvision", reference), ("rcnnops", ours))
    }

    def step(key, model):
        def f(_):
            model.train()
            losses = model(batch, targets)
            sum(losses.values()).backward()
            optimisers[key].step()
            optimisers[key].zero_grad(set_to_none=True)

        return f

    iterations = TRAIN_ITERATIONS if "resnet50" in name else 2 * TRAIN_ITERATIONS
    training = ab(
        {"torchvision": step("torchvision", reference), "rcnnops": step("rcnnops", ours)},
        range(iterations),
    )
    rows, ratios = [], {}
    for what, times, unit in (("inference", inference, "ms/img"), ("training", training, "s/iter")):
        per = [o / r for o, r in zip(times["rcnnops"], times["torchvision"], strict=True)]
        ratios[what] = statistics.median(per)
        scale = 1.0 if unit == "s/iter" else 1000.0
        rows.append(
            {
                "detector": name,
                "measure": f"{what} ({unit})",
                "torchvision": statistics.median(times["torchvision"]) * scale,
                "torchvision spread": spread(times["torchvision"], scale, 1 if scale == 1 else 0),
                "rcnnops": statistics.median(times["rcnnops"]) * scale,
                "rcnnops spread": spread(times["rcnnops"], scale, 1 if scale == 1 else 0),
                "rcnnops / torchvision": ratios[what],
                "ratio IQR": iqr(per),
            }
        )
    return rows, {"ratios": ratios, "same_detections": same, "iterations": iterations - 1}


def run(ctx: Ctx) -> dict:
    rows, targets, notes = [], [], []
    for name in (
        "fasterrcnn_resnet50_fpn",
        "maskrcnn_resnet50_fpn",
        "fasterrcnn_mobilenet_v3_large_fpn",
    ):
        t, (found, info) = timed(lambda name=name: _detector_rows(ctx, name))
        rows += found
        for what, value in info["ratios"].items():
            targets.append(
                {
                    "name": f"rcnnops / torchvision {what}, {name}",
                    "value": value,
                    "unit": "x",
                    "target": f"<= {LIMIT}",
                    "holds": value <= LIMIT,
                }
            )
        notes.append(
            f"{name}: {len(ctx.images) - 1} timed photos, {info['iterations']} timed training "
            f"iterations (one warm-up each); same detections per photo: "
            f"{'yes' if info['same_detections'] else 'NO'} ({t:.0f} s)"
        )
    detector_cols = list(rows[0])
    return {
        "title": "6. Peer: rcnnops vs torchvision's detectors, same photos, same weights",
        "paper": "-",
        "columns": detector_cols,
        "rows": rows,
        "targets": targets,
        "notes": notes
        + [
            "from-scratch configuration on both sides (weights=None: trainable BatchNorm, "
            "every backbone stage trained); training: 2 photos, 3 fixed boxes each, SGD",
        ],
    }
