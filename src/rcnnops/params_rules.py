"""Rules across params fields, checked after the types and ranges of
:mod:`rcnnops.config`'s models: variants known, generator sizes consistent,
gate metrics that evaluate reports, stage outputs inside the project."""

from __future__ import annotations

from pathlib import Path

from rcnnops.config import MASK_VARIANTS, STAT_NAMES, VARIANTS, Params, ParamsError


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
        for key in ("min_size", "max_size"):
            value = vp.model.get(key)
            sizes = value if isinstance(value, list) else [value]
            if value is not None and not all(isinstance(v, int) and v > 0 for v in sizes):
                raise ParamsError(
                    f"{src}: train.{name}.model.{key}: must be a positive integer "
                    f"(or a list of them), got {value!r}"
                )


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
