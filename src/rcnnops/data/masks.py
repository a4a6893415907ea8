"""Instance masks: COCO ``segmentation`` (polygons, RLE) <-> binary masks.

COCO stores a mask as polygons (a list of ``[x1, y1, x2, y2, ...]`` rings, several
for a multi-part object), as uncompressed RLE (``{"size": [h, w], "counts":
[int, ...]}``, used for crowd regions) or as compressed RLE (``counts`` a
string). pycocotools does the conversions; this module validates the input
first so that a bad record fails with an error naming it, not inside C code.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from rcnnops.data.coco import DataError


def check_segmentation(
    seg: Any, width: int, height: int, where: str, tolerance: float = 1.0
) -> None:
    """Raise :class:`DataError` at ``where`` unless ``seg`` is a valid COCO
    segmentation for a ``width`` x ``height`` image.

    Polygons need >= 3 points (an even number >= 6 of finite coordinates) lying
    within the image (``tolerance`` pixels of overhang allowed); RLE needs
    ``size == [height, width]`` and counts summing to ``height * width``.
    """
    if isinstance(seg, list):
        if not seg:
            raise DataError(f"{where}: 'segmentation' is an empty polygon list")
        for k, poly in enumerate(seg):
            if not isinstance(poly, list) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in poly
            ):
                raise DataError(f"{where}: segmentation polygon {k} must be a list of numbers")
            if len(poly) < 6 or len(poly) % 2:
                raise DataError(
                    f"{where}: segmentation polygon {k} has {len(poly)} coordinate(s); "
                    "a polygon needs at least 3 (x, y) points"
                )
            if not all(math.isfinite(v) for v in poly):
                raise DataError(f"{where}: segmentation polygon {k} has a non-finite coordinate")
            xs, ys = poly[0::2], poly[1::2]
            t = tolerance
            if min(xs) < -t or min(ys) < -t or max(xs) > width + t or max(ys) > height + t:
                raise DataError(
                    f"{where}: segmentation polygon {k} lies outside the image ({width}x{height})"
                )
        return
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if (
            not isinstance(size, list)
            or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)
        ):
            raise DataError(f"{where}: RLE 'size' must be [height, width], got {size!r}")
        if size != [height, width]:
            raise DataError(
                f"{where}: RLE size {size} (height, width) does not match the image "
                f"({height}x{width} h x w)"
            )
        if isinstance(counts, list):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
                raise DataError(f"{where}: RLE 'counts' must be non-negative integers")
            if sum(counts) != height * width:
                raise DataError(
                    f"{where}: RLE counts cover {sum(counts)} pixels, the image has "
                    f"{height * width}"
                )
            return
        if isinstance(counts, str):
            try:
                area = int(mask_utils.area({"size": size, "counts": counts.encode()}))
                decoded = mask_utils.decode({"size": size, "counts": counts.encode()})
            except Exception as e:  # pycocotools raises bare exceptions on bad strings
                raise DataError(f"{where}: RLE 'counts' string cannot be decoded: {e}") from None
            if decoded.shape != (height, width) or area < 0:
                raise DataError(f"{where}: RLE 'counts' does not describe a {height}x{width} mask")
            return
        raise DataError(f"{where}: RLE 'counts' must be a list of integers or a string")
    raise DataError(
        f"{where}: 'segmentation' must be polygons (a list) or RLE (an object), "
        f"got {type(seg).__name__}"
    )


def to_rle(seg: Any, width: int, height: int) -> dict:
    """A (validated) COCO segmentation as one compressed RLE (polygon parts merged)."""
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    if isinstance(seg["counts"], list):
        return mask_utils.frPyObjects(seg, height, width)
    return {"size": seg["size"], "counts": seg["counts"].encode()}


def decode(seg: Any, width: int, height: int) -> np.ndarray:
    """A COCO segmentation as a ``uint8 [height, width]`` mask of 0/1."""
    return mask_utils.decode(to_rle(seg, width, height))


def encode(mask: np.ndarray) -> dict:
    """A binary ``[H, W]`` mask as JSON-ready compressed RLE (``counts`` a str)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
