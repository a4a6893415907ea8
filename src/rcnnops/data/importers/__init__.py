"""Dataset importers: Pascal VOC XML folders and instance-mask PNG folders -> COCO JSON.

Both write ``<out>/annotations/instances_<split>.json`` (a COCO instances file)
and copy no images: each ``file_name`` is relative to the images folder the
importer reports (``JPEGImages`` for VOC, ``--images`` for masks), so
``params.yaml`` points at the result with::

    data:
      root: <out>
      train: {annotations: annotations/instances_train.json, images: <images, relative to out>}

Boxes are written as COCO ``[x, y, w, h]`` in absolute pixels of the image as
stored on disk (after EXIF rotation, as the rest of rcnnops reads images).
The result is checked with :func:`validate_coco` and written atomically
(temporary file + ``os.replace``): on any error nothing is written.

This package holds what both share; the formats are :mod:`.voc` and :mod:`.mask_png`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rcnnops.data.io import DEFAULT_MAX_IMAGE_PIXELS, DataError
from rcnnops.data.validate import validate_coco
from rcnnops.files import write_atomic

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# Images above this many pixels are refused, as ``prepare`` refuses them by default;
# the importers' option (the error names it) raises it, as params raise prepare's.
MAX_IMAGE_PIXELS = DEFAULT_MAX_IMAGE_PIXELS
LIMIT_OPTION = "--max-image-pixels"


@dataclass
class ImportResult:
    """What an importer wrote, for the one-line CLI summary."""

    path: Path
    image_root: Path
    images: int
    annotations: int
    classes: int
    skipped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        rel = os.path.relpath(self.image_root.resolve(), self.path.parent.parent.resolve())
        skipped = "".join(f", {n} {what}" for what, n in self.skipped.items())
        return (
            f"{self.images} images, {self.annotations} annotations, {self.classes} classes"
            f"{skipped} -> {self.path} (images: {rel}, relative to the output folder)"
        )


def parse_classes(text: str) -> list[str]:
    """``"a,b,c"`` -> ``["a", "b", "c"]``; category ids are 1..K in this order."""
    names = [n.strip() for n in text.split(",")]
    if not names or any(not n for n in names):
        raise DataError(f"--classes {text!r}: give comma-separated non-empty class names")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"--classes {text!r}: duplicate class name(s) {dupes}")
    return names


def categories(names: Sequence[str]) -> list[dict]:
    """COCO ``categories`` for ``names``: ids 1..K in order."""
    return [{"id": i, "name": n, "supercategory": ""} for i, n in enumerate(names, start=1)]


def write_coco(
    coco: dict, out: Path, split: str, image_root: Path, max_image_pixels: int = MAX_IMAGE_PIXELS
) -> tuple[Path, dict[str, int]]:
    """Validate ``coco`` then write ``<out>/annotations/instances_<split>.json``
    atomically, as validated: boxes overhanging the image within the tolerance
    clipped (a VOC box from pixel 0, as 0-based tools write them, starts at -1).
    Returns the path and what validation changed, counted (for the summary)."""
    if not _SPLIT_NAME.fullmatch(split):
        raise DataError(f"split name {split!r}: use letters, digits, '_', '-' or '.'")
    path = Path(out) / "annotations" / f"instances_{split}.json"
    cleaned, report = validate_coco(
        coco, path, image_root, max_image_pixels=max_image_pixels, limit_setting=LIMIT_OPTION
    )
    changed = {"boxes clipped to the image": report.clipped} if report.clipped else {}
    return write_atomic(path, json.dumps(cleaned)), changed
