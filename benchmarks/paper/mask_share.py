"""5. Mask R-CNN vs Faster R-CNN: the mask branch's share, ResNet-50-FPN.

torchvision's architectures as rcnnops builds them (``rcnnops.presets``), at
800/1333, with the paper's mask head (4 convs of 256 channels, 14x14 RoIAlign,
a deconvolution to 28x28). Mask R-CNN is given Faster R-CNN's weights for every
shared layer, and both keep exactly 100 detections per photo (score threshold 0),
so the two differ only by the mask branch: its head on the 100 boxes and the
pasting of 100 masks at full resolution.
"""

from __future__ import annotations

import statistics

import torch

from benchmarks.common import ab
from benchmarks.paper.common import Ctx, iqr, load, ms, seeded, spread

DETECTIONS = 100
COCO_CLASSES = 91  # torchvision's COCO label space


def run(ctx: Ctx) -> dict:
    from rcnnops.models import build_model
    from rcnnops.presets import FASTERRCNN_RESNET50_FPN, MASKRCNN_RESNET50_FPN

    forced = {"box_score_thresh": 0.0, "box_detections_per_img": DETECTIONS}
    faster = seeded(build_model, "faster_rcnn", COCO_CLASSES, FASTERRCNN_RESNET50_FPN | forced)
    mask = seeded(build_model, "mask_rcnn", COCO_CLASSES, MASKRCNN_RESNET50_FPN | forced)
    missing, unexpected = mask.load_state_dict(faster.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("roi_heads.mask_") for k in missing), missing
    faster.eval(), mask.eval()
    photos = [load(p) for p in ctx.images]
    counts: dict[str, list[int]] = {"faster": [], "mask": []}

    def detect(model, name):
        def f(image):
            with torch.inference_mode():
                out = model([image])[0]
            counts[name].append(len(out["boxes"]))

        return f

    times = ab(
        {"Faster R-CNN": detect(faster, "faster"), "Mask R-CNN": detect(mask, "mask")}, photos
    )
    shares = [m / f - 1 for m, f in zip(times["Mask R-CNN"], times["Faster R-CNN"], strict=True)]
    share = statistics.median(shares)
    rows = [
        {"model": name, "ms/img": ms(t), "spread ms": spread(t)} for name, t in times.items()
    ] + [
        {
            "model": "mask branch (Mask / Faster - 1)",
            "ms/img": None,
            "spread ms": f"IQR {iqr(shares)}",
        }
    ]
    rows[-1]["share"] = share
    for r in rows[:-1]:
        r["share"] = None
    return {
        "title": "5. Mask R-CNN vs Faster R-CNN: the mask branch's share (ResNet-50-FPN, 800/1333)",
        "paper": "Mask R-CNN (ICCV 2017), section 4 / 5: 195 ms vs about 160 ms per image "
        "on a GPU (ResNet-101-FPN), the mask branch about +20 %",
        "columns": ["model", "ms/img", "spread ms", "share"],
        "rows": rows,
        "targets": [
            {
                "name": "Mask R-CNN / Faster R-CNN - 1, ResNet-50-FPN, 100 detections",
                "value": share,
                "unit": "",
                "target": "about +0.20 (paper, GPU)",
                "holds": None,
            }
        ],
        "notes": [
            f"{len(photos) - 1} timed photos (one warm-up); detections per photo "
            f"{min(counts['mask'])}-{max(counts['mask'])} (forced to {DETECTIONS}: score "
            "threshold 0)",
            "masks are pasted into full-resolution images, as torchvision's "
            "postprocessing does; the paper's figure excludes nothing either",
        ],
    }
