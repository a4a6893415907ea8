"""Small value checks on parsed COCO records, shared by validation and masks.

JSON gives any type anywhere: these say whether a value is the number, list of
numbers or id a record needs, so the caller can raise an error naming it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from rcnnops.data.io import MAX_ID, DataError, short


def int_id(rec: Any, key: str, where: str, low: int = 0) -> int:
    """An id in ``[low, 2**63)``: ids become int64 tensors and numpy arrays."""
    v = rec.get(key) if isinstance(rec, dict) else None
    if isinstance(v, bool) or not isinstance(v, int):
        raise DataError(f"{where}: '{key}' must be an integer, got {short(v)}")
    if not low <= v <= MAX_ID:
        raise DataError(f"{where}: '{key}' must be an integer in [{low}, 2**63), got {short(v)}")
    return v


def has_size(lo: float, hi: float) -> bool:
    """Whether ``[lo, lo + (hi - lo)]`` keeps a positive extent in float32, as the
    dataset computes xyxy boxes (torchvision refuses boxes without one)."""
    if not hi > lo:
        return False
    start = np.float32(lo)
    return bool(start + np.float32(hi - lo) > start)


def finite_floats(values: Any, n: int | None = None) -> list[float] | None:
    """``values`` as floats if it is a list of (``n``) finite real numbers, else None.

    JSON booleans are not numbers here; ints too large for a float are not finite."""
    if not isinstance(values, list) or (n is not None and len(values) != n):
        return None
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float):
            return None
        try:
            f = float(v)
        except OverflowError:
            return None
        if not math.isfinite(f):
            return None
        out.append(f)
    return out
