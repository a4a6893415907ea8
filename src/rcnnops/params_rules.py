"""Rules across params fields, checked after the types and ranges of
:mod:`rcnnops.config`'s models: variants known, generator sizes consistent,
gate metrics that evaluate reports, stage outputs inside the project, each
variant's model keys and counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rcnnops.config import MASK_VARIANTS, STAT_NAMES, VARIANTS, Params, ParamsError
from rcnnops.params_errors import did_you_mean


def check(p: Params, src: str) -> None:
    """Rules across fields (types and ranges are the models' own)."""
    for v in p.variants:
        if v not in VARIANTS:
            raise ParamsError(f"{src}: variants: unknown variant {v!r}; known: {list(VARIANTS)}")
        p.variant(v)
    g = p.generate
    if not g.classes:
        raise ParamsError(f"{src}: generate.classes: at least one class is needed")
    if g.max_object_size > g.image_size or g.min_object_size > g.max_object_size:
        raise ParamsError(f"{src}: generate: need min_object_size <= max_object_size <= image_size")
    if p.pipeline.parallel != "auto" and p.pipeline.parallel <= 0:
        raise ParamsError(f"{src}: pipeline.parallel: must be > 0, got {p.pipeline.parallel}")
    for name, vp in p.train.variants.items():
        if sorted(vp.lr_steps) != vp.lr_steps:
            raise ParamsError(
                f"{src}: train.{name}.lr_steps: must be increasing epochs, got {vp.lr_steps}"
            )
    if p.train.device not in ("auto", "cpu") and not p.train.device.startswith("cuda"):
        raise ParamsError(
            f"{src}: train.device: 'auto', 'cpu' or 'cuda[:N]', got {p.train.device!r}"
        )
    _check_gate_metrics(p, src)
    for section in ("generate", "prepare", "proposals", "train", "evaluate"):
        _check_output(getattr(p, section).out, f"{src}: {section}.out")
    for name, vp in p.train.variants.items():
        _check_model(name, vp.model, src)


# The keys each variant's ``train.<variant>.model`` takes: its builder's parameters
# (tests/code/test_models.py holds them equal). Checked when params load, so a typo
# stops the run before its data stages, not at its training (the builders live in
# the torch modules, which loading params does not import).
_DETECTOR = {
    "backbone",
    "box_batch_size_per_image",
    "box_detections_per_img",
    "box_head",
    "box_nms_thresh",
    "box_score_thresh",
    "max_size",
    "min_size",
    "norm",
    "pretrained",
    "representation_size",
    "roi_op",
    "sampling_ratio",
    "stride",
}
_RPN = {
    "anchor_sizes",
    "aspect_ratios",
    "rpn_post_nms_top_n_test",
    "rpn_post_nms_top_n_train",
    "rpn_pre_nms_top_n_test",
    "rpn_pre_nms_top_n_train",
    "rpn_score_thresh",
}
_SAMPLED = {"bg_iou_low", "box_positive_fraction", "fg_iou", "proposals_test", "proposals_train"}
MODEL_KEYS: dict[str, frozenset[str]] = {
    "rcnn": frozenset(
        (_DETECTOR - {"backbone", "box_head", "roi_op", "sampling_ratio", "stride"})
        | _SAMPLED | {"classifier", "context", "crop_chunk", "crop_net", "warp_size", "width"}
    ),
    "fast_rcnn": frozenset(_DETECTOR | _SAMPLED),
    "faster_rcnn": frozenset(_DETECTOR | _RPN),
    "mask_rcnn": frozenset(
        _DETECTOR | _RPN | {"mask_head_channels", "mask_head_layers", "mask_head_norm",
                            "mask_roi_op", "mask_roi_size", "mask_sampling_ratio"}
    ),
}  # fmt: skip
# Counts and sizes: positive integers (0 failed deep in the model, or as a loss that
# blamed the learning rate).
_COUNTS = {"box_batch_size_per_image", "box_detections_per_img", "context", "crop_chunk",
           "mask_head_channels", "mask_head_layers", "mask_roi_size", "proposals_test",
           "proposals_train", "representation_size", "rpn_post_nms_top_n_test",
           "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_pre_nms_top_n_train",
           "warp_size", "width"}  # fmt: skip


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _check_model(variant: str, model: dict, src: str) -> None:
    where = f"{src}: train.{variant}.model"
    allowed = MODEL_KEYS.get(variant, frozenset())
    unknown = sorted(set(model) - allowed)
    if unknown:
        hint = did_you_mean(unknown, sorted(allowed))
        raise ParamsError(f"{where}: unknown key(s) {unknown}{hint}; allowed: {sorted(allowed)}")
    for key in ("min_size", "max_size"):
        value = model.get(key)
        sizes = value if isinstance(value, list) else [value]
        if value is not None and not (sizes and all(_positive_int(v) for v in sizes)):
            raise ParamsError(
                f"{where}.{key}: must be a positive integer (or a non-empty list of "
                f"them), got {value!r}"
            )
    for key in sorted(_COUNTS & set(model)):
        if not _positive_int(model[key]):
            raise ParamsError(f"{where}.{key}: must be a positive integer, got {model[key]!r}")


def gate_metrics(variant: str) -> list[str]:
    """The metrics ``evaluate`` reports for ``variant`` (any can gate promotion)."""
    types = ("bbox", "segm") if variant in MASK_VARIANTS else ("bbox",)
    return [f"{t}_{n}" for t in types for n in STAT_NAMES]


def _check_gate_metrics(p: Params, src: str) -> None:
    """``register.metric`` / ``variant_metric`` must be metrics ``evaluate`` reports
    for the variants they gate (a typo would never promote anything)."""
    r = p.register
    for variant in r.variant_metric:
        if variant not in VARIANTS:
            raise ParamsError(
                f"{src}: register.variant_metric: unknown variant {variant!r}; "
                f"known: {list(VARIANTS)}"
            )
    for variant in p.variants:
        metric = r.metric_for(variant)
        if metric not in gate_metrics(variant):
            where = (
                f"register.variant_metric.{variant}"
                if variant in r.variant_metric
                else "register.metric"
            )
            raise ParamsError(
                f"{src}: {where}: {metric!r} is not a metric evaluate reports for {variant}; "
                f"choose one of {gate_metrics(variant)}"
            )


def _check_output(out: str, where: str) -> None:
    """Stage outputs are folders inside the project: relative, below it, not it."""
    path = Path(out)
    parts = path.parts
    if path.is_absolute() or not parts or ".." in parts or path == Path("."):
        raise ParamsError(
            f"{where}: an output folder inside the project (relative, no '..'), got {out!r}"
        )
