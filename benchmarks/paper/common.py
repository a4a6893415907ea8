"""What the paper-scale rows share: the photos, their proposals, the papers'
architectures, and timing summaries with their spread.

Speed does not depend on the weights, only on the work, so every network here
has random weights (seeded) and the work each row states is fixed: proposals per
image, detections per image, image size.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import REPO

COCO_MINI = REPO.parent / "shared" / "data" / "coco-mini"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MAX_SIDE = 640  # params.yaml's proposals.max_side (benchmarks/ss_max_side.md)
PROPOSALS = 2000  # per image, the papers' selective-search budget
PASCAL_CLASSES = 21  # VGG16 rows: PASCAL VOC's 20 classes + background

# The papers' VGG16 detectors, built by rcnnops (backbone / crop_net ``vgg16``).
VGG16_FAST_RCNN = {  # Fast R-CNN: 600 px shorter side, RoIPool 7x7, fc6/fc7 4096
    "backbone": "vgg16",
    "min_size": 600,
    "max_size": 1000,
    "roi_op": "pool",
    "box_head": "mlp",
    "representation_size": 4096,
    "proposals_test": PROPOSALS,
}
VGG16_FASTER_RCNN = {  # Faster R-CNN: the same, with an RPN (9 anchors, 300 proposals)
    key: value for key, value in VGG16_FAST_RCNN.items() if key != "proposals_test"
} | {
    "anchor_sizes": [128, 256, 512],
    "rpn_pre_nms_top_n_test": 6000,
    "rpn_post_nms_top_n_test": 300,
}
VGG16_RCNN = {  # R-CNN: 227 px warps with 16 px of context through VGG16
    "crop_net": "vgg16",
    "warp_size": 227,
    "context": 16,
    "min_size": 600,
    "max_size": 1000,
    "representation_size": 4096,
    "crop_chunk": 64,
    "proposals_test": PROPOSALS,
}


@dataclass(frozen=True)
class Ctx:
    """``work``: scratch folder; ``images``: the photos the networks are timed on;
    ``search_images``: the (more) photos selective search is measured on;
    ``annotations``: their COCO file when they come from one (recall needs it)."""

    work: Path
    images: tuple[Path, ...]
    search_images: tuple[Path, ...]
    annotations: Path | None

    def to_json(self) -> str:
        return json.dumps(
            {
                "work": str(self.work),
                "images": [str(p) for p in self.images],
                "search_images": [str(p) for p in self.search_images],
                "annotations": str(self.annotations) if self.annotations else None,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Ctx:
        d = json.loads(text)
        ann = Path(d["annotations"]) if d["annotations"] else None
        paths = {k: tuple(Path(p) for p in d[k]) for k in ("images", "search_images")}
        return cls(Path(d["work"]), paths["images"], paths["search_images"], ann)


def photos(spec: str, count: int) -> tuple[list[Path], Path | None]:
    """``--images``: a number N (coco-mini's annotated val photos, by name) or a
    folder (its photos, by name; a COCO split folder also gives its annotations).
    At most ``count`` photos (N when a number is given)."""
    if spec.isdigit():
        folder, count = COCO_MINI / "val2017", int(spec)
    else:
        folder = Path(spec)
    if not folder.is_dir():
        raise SystemExit(
            f"--images: {folder} is not a folder"
            + (
                " (../shared/data/coco-mini is missing; give --images DIR)"
                if spec.isdigit()
                else ""
            )
        )
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    ann = folder.parent / "annotations" / f"instances_{folder.name}.json"
    if ann.is_file():  # coco-mini's val2017 has more JPEGs than annotated images
        listed = {im["file_name"] for im in json.loads(ann.read_text())["images"]}
        files = [p for p in files if p.name in listed]
    if not files:
        raise SystemExit(f"--images: no .jpg/.png photos in {folder}")
    return files[:count], ann if ann.is_file() else None


def load(path: Path) -> torch.Tensor:
    from rcnnops.data.io import load_image

    return load_image(path)


def search(path: Path, mode: str = "fast", max_side: int | None = MAX_SIDE):
    """Selective search on one photo, as the proposals stage runs it (one thread)."""
    import cv2

    from rcnnops.data.io import load_image_array
    from rcnnops.proposals.selective_search import selective_search

    cv2.setNumThreads(1)
    boxes, _ = selective_search(load_image_array(path), mode, PROPOSALS, max_side=max_side)
    return boxes


def cached_proposals(ctx: Ctx, path: Path) -> torch.Tensor:
    """The photo's fast-mode selective search at MAX_SIDE, searched once per work
    folder (``fixed`` then makes it the papers' fixed count)."""
    cache = ctx.work / "proposals" / f"{path.stem}.npy"
    if cache.is_file():
        boxes = np.load(cache)
    else:
        boxes = search(path)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, boxes)
    return torch.from_numpy(boxes)


def fixed(boxes: torch.Tensor, n: int = PROPOSALS) -> torch.Tensor:
    """Exactly ``n`` boxes: the first ``n``, or all of them cycled up to ``n``."""
    if len(boxes) >= n:
        return boxes[:n]
    reps = -(-n // max(len(boxes), 1))
    return boxes.repeat(reps, 1)[:n]


def seeded(builder, *args: Any, seed: int = 0, **kwargs: Any):
    torch.manual_seed(seed)
    return builder(*args, **kwargs)


def ms(seconds: list[float]) -> float:
    return 1000.0 * statistics.median(seconds)


def spread(values: list[float], scale: float = 1000.0, digits: int = 0) -> str:
    """``min-max`` of timings (ms by default), so a busy machine shows."""
    if not values:
        return "-"
    lo, hi = min(values) * scale, max(values) * scale
    return f"{lo:.{digits}f}-{hi:.{digits}f}"


def iqr(values: list[float], digits: int = 2) -> str:
    """The interquartile range of per-image ratios (or min-max under 4 values)."""
    if len(values) < 4:
        return spread(values, 1.0, digits)
    q = statistics.quantiles(values, n=4)
    return f"{q[0]:.{digits}f}-{q[2]:.{digits}f}"
