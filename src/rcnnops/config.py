"""Typed, validated parameters: one dataclass per ``params.yaml`` section.

``params.yaml`` is parsed once, at the boundary (a stage's ``main`` or the CLI);
everything below takes plain objects and numbers. A bad value raises
:class:`ParamsError` naming the file and the dotted field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

VARIANTS = ("rcnn", "fast_rcnn", "faster_rcnn", "mask_rcnn")
# Variants that consume precomputed (selective search) proposals.
USES_PROPOSALS: frozenset[str] = frozenset({"rcnn", "fast_rcnn"})


class ParamsError(ValueError):
    """A parameter file or value is invalid (the message names file and field)."""


@dataclass(frozen=True)
class SplitSource:
    """Where one split of a COCO dataset lives, relative to ``DataParams.root``."""

    annotations: str
    images: str


@dataclass(frozen=True)
class DataParams:
    """The raw dataset: a COCO instances dataset under ``root``.

    ``val: null`` makes ``prepare`` split a validation set off ``train``.
    """

    root: str = "data/raw/shapes"
    train: SplitSource = SplitSource("annotations/instances_train.json", "train")
    val: SplitSource | None = SplitSource("annotations/instances_val.json", "val")


@dataclass(frozen=True)
class GenerateParams:
    """The embedded default dataset ("shapes"), written as COCO to ``out``."""

    out: str = "data/raw/shapes"
    num_train: int = 320
    num_val: int = 80
    image_size: int = 128
    classes: list[str] = field(default_factory=lambda: ["circle", "square", "triangle"])
    max_objects: int = 4
    min_object_size: int = 16
    max_object_size: int = 48
    max_rotation: float = 15.0  # degrees, each shape turned uniformly within +-this
    empty_fraction: float = 0.05
    seed: int = 0


@dataclass(frozen=True)
class PrepareParams:
    out: str = "data/prepared"
    val_fraction: float = 0.2
    seed: int = 0
    # Drop (and count) annotations with zero-size boxes instead of failing.
    drop_degenerate: bool = False
    # Boxes may overhang the image by this many pixels (rounding in real
    # annotation tools); they are clipped. Beyond it they are errors.
    box_tolerance: float = 1.0
    # Images with more pixels than this (width x height) are refused: a huge or
    # forged image header must not exhaust memory in decoding or mask drawing.
    max_image_pixels: int = 50_000_000


@dataclass(frozen=True)
class ProposalsParams:
    """Selective search (stage ``proposals``), for the rcnn and fast_rcnn variants."""

    out: str = "data/proposals"
    mode: Literal["fast", "quality", "single"] = "fast"
    max_boxes: int = 2000
    min_size: int = 8
    dedup_iou: float = 0.95
    workers: int = 2


@dataclass(frozen=True)
class VariantTrainParams:
    """Solver settings for one variant plus the keyword arguments of its builder."""

    epochs: int = 12
    batch_size: int = 4
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    lr_steps: list[int] = field(default_factory=lambda: [8, 11])
    gamma: float = 0.1
    amp: bool = True
    hflip: float = 0.5
    clip_grad_norm: float | None = 10.0
    model: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainParams:
    """Settings shared by the variants' trainings.

    ``nproc``: data-parallel processes on this machine (``rcnnops train`` runs
    itself under torchrun when > 1; one GPU each on CUDA). ``batch_size`` is per
    process and ``lr`` is scaled by the number of processes (see
    :mod:`rcnnops.distributed`). ``sync_bn``: SyncBatchNorm across processes
    (CUDA only; on CPU each process keeps its own batch statistics).
    """

    out: str = "models"
    device: str = "auto"
    seed: int = 0
    workers: int = 0
    log_every: int = 10
    eval_every: int = 1
    nproc: int = 1
    sync_bn: bool = False
    variants: dict[str, VariantTrainParams] = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluateParams:
    """COCO evaluation (stage ``evaluate``; also the per-epoch validation AP).

    ``backend``: the COCOeval implementation, pycocotools (the reference) or
    faster-coco-eval (C++; the same metrics to ~1e-16).
    """

    out: str = "reports"
    batch_size: int = 8
    backend: Literal["pycocotools", "faster_coco_eval"] = "pycocotools"


@dataclass(frozen=True)
class RegisterParams:
    """The promotion gate: ``metric`` (or the variant's entry in ``variant_metric``)
    must beat the champion's by more than ``min_improvement``."""

    metric: str = "bbox_AP"
    variant_metric: dict[str, str] = field(default_factory=lambda: {"mask_rcnn": "segm_AP"})
    min_improvement: float = 0.0
    experiment: str = "rcnnops"

    def metric_for(self, variant: str) -> str:
        """The primary metric of ``variant`` (segm AP for Mask R-CNN by default)."""
        return self.variant_metric.get(variant, self.metric)


@dataclass(frozen=True)
class PipelineParams:
    """How the flow runs the stages. No stage depends on these: changing them
    retrains nothing.

    ``parallel``: variants trained / evaluated at once ("auto": one per GPU on a
    CUDA machine, 1 on a CPU, where one training already uses every core). On a
    GPU machine a ``gpu`` concurrency limit (one slot per GPU) also holds, so a
    GPU is never given two trainings whatever ``parallel`` says.
    ``remote``: the DVC remote the flow pulls from and pushes to (a folder, or a
    URL such as ``s3://bucket/rcnnops``); null keeps the project's own DVC default
    remote. ``$RCNNOPS_DVC_REMOTE`` overrides it. ``pull``: ``dvc pull`` what is
    missing before the run (what a teammate pushed), so it is not rebuilt.
    """

    parallel: int | Literal["auto"] = "auto"
    remote: str | None = ".dvcremote"
    pull: bool = True


@dataclass(frozen=True)
class Params:
    variants: list[str]
    data: DataParams
    generate: GenerateParams
    prepare: PrepareParams
    proposals: ProposalsParams
    train: TrainParams
    evaluate: EvaluateParams
    register: RegisterParams
    pipeline: PipelineParams = field(default_factory=PipelineParams)

    def variant(self, name: str) -> VariantTrainParams:
        if name not in self.train.variants:
            raise ParamsError(
                f"params: train.{name}: no training section for variant {name!r} "
                f"(have: {', '.join(sorted(self.train.variants)) or 'none'})"
            )
        return self.train.variants[name]


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Check/convert ``value`` against type hint ``tp``; raise ParamsError at ``where``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ParamsError as e:
                errors.append(str(e))
        raise ParamsError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ParamsError(f"{where}: expected one of {typing.get_args(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParamsError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported type {tp!r} at {where}")


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def _positive(where: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ParamsError(f"{where}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check(p: Params, src: str) -> None:
    for v in p.variants:
        if v not in VARIANTS:
            raise ParamsError(f"{src}: variants: unknown variant {v!r}; known: {list(VARIANTS)}")
        p.variant(v)
    g = p.generate
    for name in ("num_train", "num_val", "image_size", "min_object_size", "max_object_size"):
        _positive(f"{src}: generate.{name}", getattr(g, name))
    if not g.classes:
        raise ParamsError(f"{src}: generate.classes: at least one class is needed")
    if g.max_object_size > g.image_size or g.min_object_size > g.max_object_size:
        raise ParamsError(f"{src}: generate: need min_object_size <= max_object_size <= image_size")
    if not 0.0 <= g.empty_fraction <= 1.0:
        raise ParamsError(f"{src}: generate.empty_fraction: must be in [0, 1]")
    if p.pipeline.parallel != "auto":
        _positive(f"{src}: pipeline.parallel", p.pipeline.parallel)
    _positive(f"{src}: proposals.max_boxes", p.proposals.max_boxes)
    _positive(f"{src}: proposals.workers", p.proposals.workers)
    if not 0.0 < p.prepare.val_fraction < 1.0:
        raise ParamsError(f"{src}: prepare.val_fraction: must be in (0, 1)")
    _positive(f"{src}: prepare.max_image_pixels", p.prepare.max_image_pixels)
    _positive(f"{src}: prepare.box_tolerance", p.prepare.box_tolerance, allow_zero=True)
    for name, vp in p.train.variants.items():
        w = f"{src}: train.{name}"
        _positive(f"{w}.epochs", vp.epochs)
        _positive(f"{w}.batch_size", vp.batch_size)
        _positive(f"{w}.lr", vp.lr)
        _positive(f"{w}.warmup_iters", vp.warmup_iters, allow_zero=True)
        if sorted(vp.lr_steps) != vp.lr_steps:
            raise ParamsError(f"{w}.lr_steps: must be increasing epochs, got {vp.lr_steps}")
        if not 0.0 <= vp.hflip <= 1.0:
            raise ParamsError(f"{w}.hflip: must be a probability in [0, 1]")
    _positive(f"{src}: train.nproc", p.train.nproc)
    if p.train.device not in ("auto", "cpu") and not p.train.device.startswith("cuda"):
        raise ParamsError(
            f"{src}: train.device: 'auto', 'cpu' or 'cuda[:N]', got {p.train.device!r}"
        )


_TRAIN_COMMON = {f.name for f in dataclasses.fields(TrainParams)} - {"variants"}


def parse_params(raw: Any, src: str = "params.yaml") -> Params:
    """Build :class:`Params` from a parsed YAML mapping; ``src`` names it in errors."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{src}: expected a mapping at the top level")
    raw = dict(raw)
    train_raw = dict(raw.pop("train", None) or {})
    variant_sections = {k: train_raw.pop(k) for k in list(train_raw) if k not in _TRAIN_COMMON}
    unknown = sorted(set(variant_sections) - set(VARIANTS))
    if unknown:
        raise ParamsError(
            f"{src}: train: unknown key(s) {unknown}; allowed: {sorted(_TRAIN_COMMON)} "
            f"or a variant name {list(VARIANTS)}"
        )
    train = _build(TrainParams, train_raw, f"{src}: train")
    variants_parsed = {
        k: _build(VariantTrainParams, v, f"{src}: train.{k}") for k, v in variant_sections.items()
    }
    train = dataclasses.replace(train, variants=variants_parsed)
    sections = {
        "data": DataParams,
        "generate": GenerateParams,
        "prepare": PrepareParams,
        "proposals": ProposalsParams,
        "evaluate": EvaluateParams,
        "register": RegisterParams,
        "pipeline": PipelineParams,
    }
    unknown = sorted(set(raw) - set(sections) - {"variants"})
    if unknown:
        raise ParamsError(f"{src}: unknown section(s) {unknown}")
    variants = _convert(list[str], raw.get("variants", ["faster_rcnn"]), f"{src}: variants")
    built = {k: _build(cls, raw.get(k), f"{src}: {k}") for k, cls in sections.items()}
    params = Params(variants=variants, train=train, **built)
    _check(params, src)
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found (run from the project folder)") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    return parse_params(raw, str(path))


def to_dict(obj: Any) -> Any:
    """Plain JSON-able form of a params object (for hashing and logging)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    return obj


def stable_hash(obj: Any) -> str:
    """Short sha256 of a JSON-able object with sorted keys."""
    blob = json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _assign(node: Any, keys: list[str], value: Any, where: str) -> int:
    """Set ``keys`` (``*`` matches every key of a mapping) under ``node``; count the hits."""
    if not isinstance(node, dict):
        raise ParamsError(f"{where}: not a mapping")
    head, rest = keys[0], keys[1:]
    targets = [k for k in node if isinstance(node[k], dict)] if head == "*" else [head]
    hits = 0
    for k in targets:
        if not rest:
            node[k] = value
            hits += 1
        else:
            if k not in node:
                node[k] = {}
            hits += _assign(node[k], rest, value, f"{where}.{k}")
    return hits


def set_params(path: str | Path, assignments: dict[str, Any]) -> Params:
    """Edit ``params.yaml`` in place, as ``dvc exp run -S`` does, keeping its comments.

    ``assignments`` maps dotted keys (``train.faster_rcnn.epochs``; ``*`` for
    every key at one level, e.g. ``train.*.epochs``) to values. The edited file
    is validated first; if it is invalid, nothing is written.
    """
    import io
    import os

    from ruamel.yaml import YAML

    path = Path(path)
    rt = YAML()
    rt.preserve_quotes = True
    try:
        doc = rt.load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found (run from the project folder)") from None
    for key, value in assignments.items():
        if not key or any(not part for part in key.split(".")):
            raise ParamsError(f"{path}: invalid key {key!r} (use dotted names: a.b.c)")
        if _assign(doc, key.split("."), value, str(path)) == 0:
            raise ParamsError(f"{path}: {key}: no such keys to set")
    buf = io.StringIO()
    rt.dump(doc, buf)
    params = parse_params(yaml.safe_load(buf.getvalue()), str(path))
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)
    return params
