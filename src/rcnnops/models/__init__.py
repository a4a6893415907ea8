"""The R-CNN variants: ``MODELS[name](num_classes, **model_params) -> nn.Module``.

Every variant follows torchvision's detection API (see DESIGN.md, Contracts).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from rcnnops.config import MASK_VARIANTS, USES_PROPOSALS
from rcnnops.models import fast_rcnn, faster_rcnn, mask_rcnn, rcnn
from rcnnops.models.fp32 import keep_heads_fp32

MODELS: dict[str, Callable[..., nn.Module]] = {
    "rcnn": rcnn.build,
    "fast_rcnn": fast_rcnn.build,
    "faster_rcnn": faster_rcnn.build,
    "mask_rcnn": mask_rcnn.build,
}


__all__ = ["MASK_VARIANTS", "MODELS", "USES_PROPOSALS", "build_model"]


def build_model(variant: str, num_classes: int, model_params: dict[str, Any]) -> nn.Module:
    """Build ``variant`` for ``num_classes`` (K + 1, background included).

    Unknown variants or parameter names raise ``ValueError`` listing what exists.
    The heads' outputs stay fp32 under autocast (see :mod:`rcnnops.models.fp32`).
    """
    if variant not in MODELS:
        raise ValueError(
            f"unknown or not yet available variant {variant!r}; available: {sorted(MODELS)}"
        )
    builder = MODELS[variant]
    allowed = {
        name
        for fn in getattr(builder, "params", (builder,))
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is not p.VAR_KEYWORD
    } - {"num_classes"}
    unknown = sorted(set(model_params) - allowed)
    if unknown:
        raise ValueError(
            f"train.{variant}.model: unknown key(s) {unknown}; allowed: {sorted(allowed)}"
        )
    return keep_heads_fp32(builder(num_classes, **model_params))
