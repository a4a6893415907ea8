"""The R-CNN variants: ``MODELS[name](num_classes, **model_params) -> nn.Module``.

Every variant follows torchvision's detection API (see DESIGN.md, Contracts).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from rcnnops.config import MASK_VARIANTS, USES_PROPOSALS

if TYPE_CHECKING:  # torch loads with a variant's module: rcnnops.models.io reads
    from torch import nn  # model.json without it

# Each variant's module (its ``build``), imported when the variant is first built.
# So a stage that trains or evaluates one variant imports only that variant's
# module and what it builds on, and dvc.yaml lists only those as the stage's deps
# (tests/code/test_dvc_deps.py checks both): editing mask_rcnn.py retrains Mask
# R-CNN, not the three others.
VARIANT_MODULES: dict[str, str] = {
    "rcnn": "rcnnops.models.rcnn",
    "fast_rcnn": "rcnnops.models.fast_rcnn",
    "faster_rcnn": "rcnnops.models.faster_rcnn",
    "mask_rcnn": "rcnnops.models.mask_rcnn",
}


class _Builders(Mapping[str, Callable[..., Any]]):
    """``MODELS[name]`` is the variant's ``build``, its module imported on first use."""

    def __getitem__(self, name: str) -> Callable[..., nn.Module]:
        return importlib.import_module(VARIANT_MODULES[name]).build

    def __contains__(self, name: object) -> bool:  # without importing the variant
        return name in VARIANT_MODULES

    def __iter__(self) -> Iterator[str]:
        return iter(VARIANT_MODULES)

    def __len__(self) -> int:
        return len(VARIANT_MODULES)


MODELS: Mapping[str, Callable[..., nn.Module]] = _Builders()


__all__ = [
    "MASK_VARIANTS", "MODELS", "USES_PROPOSALS", "VARIANT_MODULES", "build_model", "model_keys",
]  # fmt: skip


def model_keys(variant: str) -> set[str]:
    """The ``train.<variant>.model`` keys ``variant``'s builder takes (its
    parameters, and those of the builders it passes them on to)."""
    builder = MODELS[variant]
    return {
        name
        for fn in getattr(builder, "params", (builder,))
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is not p.VAR_KEYWORD
    } - {"num_classes"}


def build_model(variant: str, num_classes: int, model_params: dict[str, Any]) -> nn.Module:
    """Build ``variant`` for ``num_classes`` (K + 1, background included).

    Unknown variants or parameter names raise ``ValueError`` listing what exists.
    The heads' outputs stay fp32 under autocast (see :mod:`rcnnops.models.fp32`).
    """
    from rcnnops.models.fp32 import keep_heads_fp32

    if variant not in MODELS:
        raise ValueError(
            f"unknown or not yet available variant {variant!r}; available: {sorted(MODELS)}"
        )
    builder = MODELS[variant]
    allowed = model_keys(variant)
    unknown = sorted(set(model_params) - allowed)
    if unknown:
        raise ValueError(
            f"train.{variant}.model: unknown key(s) {unknown}; allowed: {sorted(allowed)}"
        )
    return keep_heads_fp32(builder(num_classes, **model_params))
