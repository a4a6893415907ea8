"""Instance masks: COCO ``segmentation`` (polygons, RLE) <-> binary masks.

COCO stores a mask as polygons (a list of ``[x1, y1, x2, y2, ...]`` rings, several
for a multi-part object), as uncompressed RLE (``{"size": [h, w], "counts":
[int, ...]}``, used for crowd regions) or as compressed RLE (``counts`` a
string). pycocotools does the conversions; this module validates the input
first so that a bad record fails with an error naming it, not inside C code.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from rcnnops.data.checks import finite_floats
from rcnnops.data.io import DataError

# Mask probabilities above this are in the mask (evaluation and serving alike).
MASK_THRESHOLD = 0.5


def check_segmentation(
    seg: Any, width: int, height: int, where: str, tolerance: float = 1.0
) -> None:
    """Raise :class:`DataError` at ``where`` unless ``seg`` is a valid COCO
    segmentation for a ``width`` x ``height`` image.

    Polygons need >= 3 points (an even number >= 6 of finite coordinates) lying
    within the image (``tolerance`` pixels of overhang allowed); RLE needs
    ``size == [height, width]`` and counts summing to ``height * width``
    (checked here, in Python, before pycocotools' C code, which trusts them).
    """
    if isinstance(seg, list):
        _check_polygons(seg, width, height, where, tolerance)
        return
    if isinstance(seg, dict):
        _check_rle(seg, width, height, where)
        return
    raise DataError(
        f"{where}: 'segmentation' must be polygons (a list) or RLE (an object), "
        f"got {type(seg).__name__}"
    )


def _check_polygons(seg: list, width: int, height: int, where: str, tolerance: float) -> None:
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
        coords = finite_floats(poly)
        if coords is None:
            raise DataError(f"{where}: segmentation polygon {k} has a non-finite coordinate")
        xs, ys = coords[0::2], coords[1::2]
        t = tolerance
        if min(xs) < -t or min(ys) < -t or max(xs) > width + t or max(ys) > height + t:
            raise DataError(
                f"{where}: segmentation polygon {k} lies outside the image ({width}x{height})"
            )


def _check_rle(seg: dict, width: int, height: int, where: str) -> None:
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
                f"{where}: RLE counts cover {sum(counts)} pixels, the image has {height * width}"
            )
        return
    if isinstance(counts, str):
        runs = rle_string_counts(counts)
        if runs is None:
            raise DataError(f"{where}: RLE 'counts' string cannot be decoded")
        if any(r < 0 for r in runs) or sum(runs) != height * width:
            raise DataError(f"{where}: RLE 'counts' does not describe a {height}x{width} mask")
        return
    raise DataError(f"{where}: RLE 'counts' must be a list of integers or a string")


def rle_string_counts(counts: str) -> list[int] | None:
    """The run lengths of a compressed COCO RLE string, or None if malformed.

    The format (pycocotools' ``rleToString``): each run is a little-endian
    sequence of 5-bit groups, one character (``48 + group``) each, bit 0x20
    meaning "more groups follow" and bit 0x10 of the last group the sign; from
    the third run on, the value is a difference to the run two places before.
    """
    runs: list[int] = []
    pos, n = 0, len(counts)
    while pos < n:
        value, shift, more = 0, 0, True
        while more:
            if pos >= n:
                return None  # ends inside a run
            c = ord(counts[pos]) - 48
            if not 0 <= c < 64:
                return None
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos += 1
            shift += 5
            if not more and c & 0x10:
                value -= 1 << shift  # sign-extend
            if shift > 64:
                return None  # pycocotools' counts are 32-bit: nothing valid is this long
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


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


def binarize(probabilities: Any) -> np.ndarray:
    """Mask probabilities (numpy array or torch tensor, any shape, e.g. ``[N, H, W]``)
    -> ``bool`` array of the same shape: a pixel is in the mask where its
    probability is above :data:`MASK_THRESHOLD`. The comparison runs where the
    values are (a tensor may be on the GPU); only the booleans are copied."""
    above = probabilities > MASK_THRESHOLD
    if hasattr(above, "cpu"):  # a torch tensor
        above = above.cpu().numpy()
    return np.asarray(above, dtype=bool)
