"""Typed, validated parameters: one pydantic model per ``params.yaml`` section.

``params.yaml`` is parsed once, at the boundary (a stage's ``main`` or the CLI);
everything below takes plain objects and numbers. Every model forbids unknown
keys and is strict (``true`` is not a number, ``"2"`` not an integer). A bad
value raises :class:`ParamsError` naming the file and the dotted field.
Editing the file (``--set``, presets) is :mod:`rcnnops.params_edit`.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rcnnops.errors import UserError

VARIANTS = ("rcnn", "fast_rcnn", "faster_rcnn", "mask_rcnn")
# COCOeval's twelve summary numbers, as metrics.json and MLflow name them
# (``bbox_AP``, ``segm_AP50``, ...); all higher-is-better, so any can gate promotion.
STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
# Variants that predict instance masks (evaluated with COCOeval "segm" as well).
MASK_VARIANTS: frozenset[str] = frozenset({"mask_rcnn"})
# Variants that consume precomputed (selective search) proposals.
USES_PROPOSALS: frozenset[str] = frozenset({"rcnn", "fast_rcnn"})


def positive(default: Any) -> Any:
    """A field that must be > 0."""
    return Field(default, gt=0)


class ParamsError(UserError, ValueError):
    """A parameter file or value is invalid (the message names file and field)."""


class Section(BaseModel):
    # No NaN or infinity anywhere: no setting means either, and a NaN compares
    # false with everything (a NaN min_improvement would never promote).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class SplitSource(Section):
    """Where one split of a COCO dataset lives, relative to ``DataParams.root``."""

    annotations: str
    images: str


class DataParams(Section):
    """The raw dataset: a COCO instances dataset under ``root``.

    ``val: null`` makes ``prepare`` split a validation set off ``train``.
    """

    root: str = "data/raw/shapes"
    train: SplitSource = SplitSource(annotations="annotations/instances_train.json", images="train")
    val: SplitSource | None = SplitSource(
        annotations="annotations/instances_val.json", images="val"
    )


class GenerateParams(Section):
    """The embedded default dataset ("shapes"), written as COCO to ``out``."""

    out: str = "data/raw/shapes"
    num_train: int = positive(320)
    num_val: int = positive(80)
    image_size: int = positive(128)
    classes: list[str] = Field(default_factory=lambda: ["circle", "square", "triangle"])
    max_objects: int = Field(4, ge=0)
    min_object_size: int = positive(16)
    max_object_size: int = positive(48)
    max_rotation: float = 15.0  # degrees, each shape turned uniformly within +-this
    empty_fraction: float = Field(0.05, ge=0.0, le=1.0)
    seed: int = Field(0, ge=0)  # numpy's generators take non-negative seeds


class PrepareParams(Section):
    out: str = "data/prepared"
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    seed: int = Field(0, ge=0)
    # Drop (and count) annotations with zero-size boxes instead of failing.
    drop_degenerate: bool = False
    # Boxes may overhang the image by this many pixels (rounding in real
    # annotation tools); they are clipped. Beyond it they are errors.
    box_tolerance: float = Field(1.0, ge=0.0)
    # Images with more pixels than this (width x height) are refused: a huge or
    # forged image header must not exhaust memory in decoding or mask drawing.
    max_image_pixels: int = positive(50_000_000)


class ProposalsParams(Section):
    """Selective search (stage ``proposals``), for the rcnn and fast_rcnn variants."""

    out: str = "data/proposals"
    mode: Literal["fast", "quality", "single"] = "fast"
    max_boxes: int = positive(2000)
    min_size: int = Field(8, ge=0)
    dedup_iou: float = Field(0.95, gt=0.0, le=1.0)  # 1: no duplicates removed
    # Longer image sides above this are searched downscaled (boxes scaled back):
    # real photos cost what the papers report. null: full resolution.
    max_side: int | None = Field(640, gt=0)
    workers: int = positive(2)
    # A Dask scheduler (e.g. tcp://10.0.0.5:8786) to search on instead of the local
    # pool; null: $DASK_SCHEDULER_ADDRESS when set, else this machine.
    cluster: str | None = None
    # Search settings whose per-image results stay in <out>-cache: the one in use and
    # the most recently used others (older ones are removed after the stage); null:
    # all of them.
    cache_keep: int | None = Field(2, gt=0)


class VariantTrainParams(Section):
    """Solver settings for one variant plus the keyword arguments of its builder."""

    epochs: int = positive(12)
    batch_size: int = positive(4)
    lr: float = positive(0.02)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    warmup_iters: int = Field(100, ge=0)
    lr_steps: list[int] = Field(default_factory=lambda: [8, 11])
    gamma: float = positive(0.1)
    # Mixed precision (see rcnnops.precision): auto (fp16 on CUDA, bf16 on CPUs with
    # AMX / AVX512-BF16, else fp32), cuda (fp16 on CUDA, fp32 on CPU), bf16, fp16, fp32.
    # true / false: the older spelling of cuda / fp32.
    amp: bool | Literal["auto", "cuda", "bf16", "fp16", "fp32"] = "cuda"
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    clip_grad_norm: float | None = Field(10.0, gt=0.0)
    # Which epoch's weights become the model: the last, or the best validated one by
    # the promotion gate's metric (register.metric / variant_metric).
    keep: Literal["last", "best"] = "last"
    # Stop after this many validations in a row without a better gate metric.
    early_stop: int | None = Field(None, gt=0)
    model: dict[str, Any] = Field(default_factory=dict)


class TrainParams(Section):
    """Settings shared by the variants' trainings, and one section per variant.

    ``nproc``: data-parallel processes on this machine (``rcnnops train`` runs
    itself under torchrun when > 1; one GPU each on CUDA). ``batch_size`` is per
    process and ``lr`` is scaled by the number of processes (see
    :mod:`rcnnops.distributed`). ``sync_bn``: SyncBatchNorm across processes
    (CUDA only; on CPU each process keeps its own batch statistics).
    """

    out: str = "models"
    device: str = "auto"
    seed: int = 0
    workers: int = Field(0, ge=0)
    log_every: int = positive(10)
    eval_every: int = positive(1)
    nproc: int = positive(1)
    sync_bn: bool = False
    variants: dict[str, VariantTrainParams] = Field(default_factory=dict)


class EvaluateParams(Section):
    """COCO evaluation (stage ``evaluate``; also the per-epoch validation AP).

    ``backend``: the COCOeval implementation, pycocotools (the reference) or
    faster-coco-eval (C++; the same metrics to ~1e-16). ``svd_rank``: replace the
    box head's FC layers by their rank-``svd_rank`` truncated SVD when a model is
    loaded for evaluation and serving (Fast R-CNN, section 3.1: faster detection,
    no retraining; changing it reruns only ``evaluate``). null keeps them whole.
    """

    out: str = "reports"
    batch_size: int = positive(8)
    backend: Literal["pycocotools", "faster_coco_eval"] = "pycocotools"
    svd_rank: int | None = Field(None, gt=0)


class RegisterParams(Section):
    """The promotion gate: ``metric`` (or the variant's entry in ``variant_metric``)
    must beat the champion's by more than ``min_improvement``."""

    metric: str = "bbox_AP"
    variant_metric: dict[str, str] = Field(default_factory=lambda: {"mask_rcnn": "segm_AP"})
    min_improvement: float = Field(0.0, ge=0.0)
    experiment: str = "rcnnops"

    def metric_for(self, variant: str) -> str:
        """The primary metric of ``variant`` (segm AP for Mask R-CNN by default)."""
        return self.variant_metric.get(variant, self.metric)


class PipelineParams(Section):
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


class ServeParams(Section):
    """``rcnnops serve``'s bounds and polling (no stage reads these). Per request:
    ``max_images``; per image, read from its header before decoding:
    ``max_image_pixels`` and ``max_image_side``; per request body:
    ``max_request_mb``. ``workers`` requests compute at once, ``max_queue`` more
    wait, more get HTTP 503; ``timeout_s`` bounds the wait plus the computing
    (checked between images). ``poll_s``: how often the alias is looked up.
    ``device``: where the model runs (auto, cpu, cuda, cuda:N)."""

    max_images: int = positive(16)
    max_image_pixels: int = positive(50_000_000)
    max_image_side: int = positive(16384)
    max_request_mb: float = positive(32.0)
    workers: int = positive(1)
    max_queue: int = Field(4, ge=0)
    timeout_s: float = positive(60.0)
    poll_s: float = positive(10.0)
    device: str = "auto"


# ``register`` is also the name of ABCMeta's method: pydantic warns, the field wins.
warnings.filterwarnings("ignore", 'Field name "register" in "Params"', UserWarning)


class Params(Section):
    variants: list[str] = Field(default_factory=lambda: ["faster_rcnn"])
    data: DataParams = DataParams()
    generate: GenerateParams = GenerateParams()
    prepare: PrepareParams = PrepareParams()
    proposals: ProposalsParams = ProposalsParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    register: RegisterParams = RegisterParams()
    pipeline: PipelineParams = PipelineParams()
    serve: ServeParams = ServeParams()

    def variant(self, name: str) -> VariantTrainParams:
        if name not in self.train.variants:
            raise ParamsError(
                f"params: train.{name}: no training section for variant {name!r} "
                f"(have: {', '.join(sorted(self.train.variants)) or 'none'})"
            )
        return self.train.variants[name]


_TRAIN_COMMON = set(TrainParams.model_fields) - {"variants"}


def parse_params(raw: Any, src: str = "params.yaml") -> Params:
    """Build :class:`Params` from a parsed YAML mapping; ``src`` names it in errors."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{src}: expected a mapping at the top level")
    train = raw.get("train") or {}
    if isinstance(train, dict):  # variant sections sit beside the shared keys
        common = {k: v for k, v in train.items() if k in _TRAIN_COMMON}
        sections = {k: v for k, v in train.items() if k not in _TRAIN_COMMON}
        unknown = sorted(set(sections) - set(VARIANTS))
        if unknown:
            raise ParamsError(
                f"{src}: train: unknown key(s) {unknown}; allowed: {sorted(_TRAIN_COMMON)} "
                f"or a variant name {list(VARIANTS)}"
            )
        raw = dict(raw, train=common | {"variants": sections})
    try:
        params = Params.model_validate({k: v for k, v in raw.items() if v is not None})
    except ValidationError as e:
        from rcnnops.params_errors import message

        raise ParamsError(message(raw, e.errors(), src, Params)) from None
    from rcnnops.params_rules import check  # the rules read Params: imported here

    check(params, src)
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found (run from the project folder)") from None
    from rcnnops.params_errors import read_yaml

    return parse_params(read_yaml(text, str(path)), str(path))


def to_dict(obj: Any) -> Any:
    """Plain JSON-able form of a params object (for hashing and logging)."""
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
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
