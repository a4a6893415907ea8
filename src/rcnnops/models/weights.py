"""Weights from outside the training run: a local file, or torchvision's weights by name.

``model.pretrained`` is a path, or ``torchvision:<Enum>.<NAME>`` (e.g.
``torchvision:FasterRCNN_ResNet50_FPN_Weights.COCO_V1``,
``torchvision:ResNet50_Weights.IMAGENET1K_V2``), resolved with torchvision's
weights API to a file in torch.hub's cache (``$TORCH_HOME/hub/checkpoints``),
downloaded there (hash-checked) only when it is missing and a network exists.

A file is either a whole detector's state dict (torchvision's layout, the same
names as rcnnops' variants) or a classification network's (ImageNet ResNet or
MobileNetV3), which goes into ``backbone.body`` (``features.N`` -> ``N`` for
MobileNet), or where the model's ``classification_body`` says (R-CNN: its
per-crop CNN, ``roi_heads.box_head.body``). :func:`load_pretrained` reports
exactly which tensors were loaded, which were re-initialised and why (a class
predictor for another number of classes; detection layers a classification
file does not have), and which of the file's tensors are not used and why (a
classifier's head). Anything else that does not fit is an error naming the
tensors, never a silent skip.

A torchvision detector's class predictors for another set of classes keep the
rows of the classes both share, matched by name against the weights' own
category list (``person``, ``dog``, ... for COCO_V1): fine-tuning COCO weights
on photos of people and dogs starts from COCO's person and dog outputs, and
only the classes COCO lacks start from the builder's initialisation. The
report lists which classes were matched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from rcnnops.errors import UserError
from rcnnops.files import sha256_file

PREFIX = "torchvision:"
DETECTOR_MODULES = ("backbone", "rpn", "roi_heads")
# Re-initialised when their shape differs (the number of classes): the class predictors.
PREDICTORS = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")
CLASSIFIER_HEADS = ("fc.", "classifier.")
BODY = "backbone.body."  # where classification weights go, unless the model says otherwise


class WeightsError(UserError, ValueError):
    """Weights that cannot be found, read or loaded into the model (named)."""


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did, tensor by tensor."""

    source: str
    file: str
    sha256: str = ""  # the file's bytes (a local file's path says nothing of them)
    loaded: list[str] = field(default_factory=list)
    reinitialised: dict[str, str] = field(default_factory=dict)  # model tensor -> why
    by_name: dict[str, str] = field(default_factory=dict)  # predictor -> classes matched
    unused: dict[str, str] = field(default_factory=dict)  # file tensor -> why

    def summary(self) -> str:
        """A few lines for the log: counts, then each reason with its tensors grouped."""
        lines = [
            f"pretrained {self.source} ({self.file}, sha256 {self.sha256[:12]}): "
            f"{len(self.loaded)} tensors loaded, "
            f"{len(self.reinitialised)} re-initialised, {len(self.unused)} of the file unused"
        ]
        parts = (
            ("rows by class name", self.by_name),
            ("re-initialised", self.reinitialised),
            ("unused", self.unused),
        )
        for title, entries in parts:
            for why, keys in _group(entries).items():
                lines.append(f"  {title}: {why}: {_names(keys)}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "file": self.file,
            "sha256": self.sha256,
            "loaded": self.loaded,
            "reinitialised": self.reinitialised,
            "by_name": self.by_name,
            "unused": self.unused,
        }


def _group(entries: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, why in entries.items():
        out.setdefault(why, []).append(key)
    return out


def _names(keys: list[str], most: int = 4) -> str:
    shown = ", ".join(keys[:most])
    return shown + (f" and {len(keys) - most} more" if len(keys) > most else "")


def hub_dir() -> Path:
    """torch.hub's checkpoint cache (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve(spec: str) -> Path:
    """The local file for ``spec``: a path as given, or a torchvision weights name
    fetched into torch.hub's cache. :class:`WeightsError` says which file to place
    where when it is missing and cannot be downloaded."""
    if not spec.startswith(PREFIX):
        path = Path(spec)
        if not path.is_file():
            raise WeightsError(f"{path}: pretrained weights file not found")
        return path
    from torchvision.models import get_weight

    name = spec.removeprefix(PREFIX)
    try:
        weights = get_weight(name)
    except (ValueError, KeyError, AttributeError) as e:
        raise WeightsError(
            f"model.pretrained {spec!r}: not a torchvision weights name ({e}); e.g. "
            f"{PREFIX}FasterRCNN_ResNet50_FPN_Weights.COCO_V1 or "
            f"{PREFIX}ResNet50_Weights.IMAGENET1K_V2"
        ) from None
    path = hub_dir() / os.path.basename(weights.url)
    if not path.is_file():
        download(spec, weights.url, path)
    return path


def download(spec: str, url: str, path: Path) -> None:
    """Fetch ``url`` to ``path`` with torch.hub (a progress bar; a ``.partial`` file
    moved into place only when whole), checked against the sha256 prefix in the
    file's name as torch.hub checks it. Not loaded here (torch.hub's
    ``load_state_dict_from_url`` would, and the caller loads it again).
    :class:`WeightsError` tells being offline from receiving other bytes (a proxy's
    or a portal's page, a cut transfer), and nothing is left in the cache either
    way."""
    found = torch.hub.HASH_REGEX.search(path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url} to {path}", flush=True)
    try:
        torch.hub.download_url_to_file(url, str(path), found.group(1) if found else None)
    except RuntimeError as e:
        if "invalid hash value" not in str(e):  # torch.hub's words for a wrong sha256
            raise
        raise WeightsError(
            f"model.pretrained {spec!r}: what {url} sent is not the file torchvision names "
            f"({e}); nothing was kept. The transfer may have been cut, or a proxy or a "
            f"login page answered instead: run again, or fetch the file another way, "
            f"place it at {path} and run again"
        ) from None
    except Exception as e:  # offline: URLError, socket errors, ...
        raise WeightsError(
            f"model.pretrained {spec!r}: {path.name} is not in torch.hub's cache and cannot "
            f"be downloaded ({type(e).__name__}: {e}); place the file at {path} "
            f"(from {url}, on a machine with a network) and run again"
        ) from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``path`` (weights only: a pickle with code in it is refused)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for bad files
        raise WeightsError(f"{path}: not a loadable weights file (weights_only=True): {e}") from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict (a mapping of names to tensors)")
    return state


def load_pretrained(
    model: nn.Module, spec: str | Path, classes: Sequence[str] | None = None
) -> LoadReport:
    """Load ``spec`` (see the module docstring) into ``model``; the report says what
    happened to every tensor. ``classes``: the model's class names (labels 1..K),
    to keep the predictor rows of the classes a torchvision detector's weights
    share with it. :class:`WeightsError` when the file does not fit."""
    path = resolve(str(spec))
    state = read_state_dict(path)
    report = LoadReport(str(spec), str(path), sha256_file(path))
    own = model.state_dict()
    body = getattr(model, "classification_body", BODY)
    if any(k.split(".")[0] in DETECTOR_MODULES for k in state):
        matcher = ClassRows(categories(str(spec)), classes)
        mapped = _detector(state, own, report, matcher)
    else:
        mapped = _classifier(state, own, report, body)
    _check_missing(own, mapped, report, body)
    model.load_state_dict(mapped, strict=False)
    report.loaded = sorted(mapped)
    return report


def categories(spec: str) -> list[str] | None:
    """The class of each output row of a torchvision detector's weights (its
    ``meta["categories"]``, background first); ``None`` for a local file."""
    if not spec.startswith(PREFIX):
        return None
    from torchvision.models import get_weight

    return list(get_weight(spec.removeprefix(PREFIX)).meta.get("categories", [])) or None


@dataclass(frozen=True)
class ClassRows:
    """Predictor rows of the classes a file and a model share, by name.

    ``file``: the file's output classes (row order, background first);
    ``model``: the model's class names for labels 1..K (row 0 is background)."""

    file: list[str] | None
    model: Sequence[str] | None
    NOT_CLASSES = ("__background__", "N/A")  # COCO_V1's placeholders

    def take(self, value: torch.Tensor, init: torch.Tensor) -> tuple[torch.Tensor, str] | None:
        """``init`` with the shared classes' rows taken from ``value`` (1 row per
        class for scores and masks, 4 for box deltas), and what was matched; ``None``
        when nothing is shared or the shapes are not per-class rows."""
        if not self.file or not self.model:
            return None
        per, extra = divmod(value.shape[0], len(self.file))
        if extra or per == 0 or init.shape != (per * (len(self.model) + 1), *value.shape[1:]):
            return None
        index = {n.lower(): i for i, n in enumerate(self.file) if n not in self.NOT_CLASSES}
        pairs = [(j, index[c.lower()]) for j, c in enumerate(self.model, 1) if c.lower() in index]
        if not pairs:
            return None
        out = init.clone()
        for j, i in [(0, 0), *pairs]:  # background's row too
            out[j * per : (j + 1) * per] = value[i * per : (i + 1) * per]
        shared = [self.model[j - 1] for j, _ in pairs]
        new = [c for c in self.model if c.lower() not in index]
        why = f"{len(shared)} of {len(self.model)} classes from the file's ({_names(shared)})"
        return out, why + (f"; new, from the builder: {_names(new)}" if new else "")


def _detector(state: dict, own: dict, report: LoadReport, matcher: ClassRows) -> dict:
    """A detector's tensors under the same names; predictors for other classes keep
    the rows of the classes shared by name (see :class:`ClassRows`) or are
    re-initialised; tensors of parts this variant lacks are unused."""
    mapped, wrong = {}, []
    have = {k.split(".")[0] for k in own}
    for key, value in state.items():
        if key in own and own[key].shape == value.shape:
            mapped[key] = value
        elif key in own and key.startswith(PREDICTORS) and (rows := matcher.take(value, own[key])):
            mapped[key], report.by_name[key] = rows
        elif key in own and key.startswith(PREDICTORS):
            report.reinitialised[key] = (
                f"class predictor for {own[key].shape[0]} outputs (the file has {value.shape[0]})"
            )
        elif key in own:
            wrong.append(f"{key} {list(value.shape)} (model: {list(own[key].shape)})")
        elif key.endswith("num_batches_tracked"):
            report.unused[key] = "BatchNorm step counter (frozen BatchNorm keeps none)"
        elif key.split(".")[0] not in have:
            report.unused[key] = f"this variant has no {key.split('.')[0]}"
        else:
            wrong.append(f"{key} (not in this model)")
    if wrong:
        raise WeightsError(
            f"{report.file}: {len(wrong)} tensor(s) do not fit this model's layers: "
            f"{_names(wrong)}; the file is another architecture (see the presets: "
            "`rcnnops presets`)"
        )
    return mapped


def _body_key(key: str, body: str) -> str:
    """A classification network's tensor name -> the model's body's (``body`` prefix)."""
    return body + key.removeprefix("features.")  # MobileNetV3: the body is `features`


def _classifier(state: dict, own: dict, report: LoadReport, body: str) -> dict:
    """ImageNet classification weights into the ``body`` prefix; their head is unused."""
    mapped, wrong = {}, []
    for key, value in state.items():
        target = _body_key(key, body)
        if key.startswith(CLASSIFIER_HEADS):
            report.unused[key] = "the classification network's head (not part of a detector)"
        elif target in own and own[target].shape == value.shape:
            mapped[target] = value
        elif key.endswith("num_batches_tracked") and target not in own:
            report.unused[key] = "BatchNorm step counter (frozen BatchNorm keeps none)"
        else:
            wrong.append(key)
    if wrong or not mapped:
        depth = body.count(".")
        layers = sorted({k.split(".")[depth] for k in own if k.startswith(body)})
        raise WeightsError(
            f"{report.file}: {len(wrong)} of its {len(state)} tensors do not fit this model's "
            f"{body.rstrip('.')} (layers {_names(layers)}): {_names(wrong)}; classification "
            "weights fit the backbones resnet18_fpn, resnet50_fpn, mobilenet_v3_fpn and vgg16, "
            "and R-CNN's crop_net resnet18, resnet50, mobilenet_v3 and vgg16"
        )
    return mapped


def _check_missing(own: dict, mapped: dict, report: LoadReport, body: str = BODY) -> None:
    """Model tensors the file did not fill: re-initialised when a whole part is new
    (a head the file's model has not, every detection layer for a classification
    file), an error when part of a layer the file has is missing."""
    from_file = {".".join(k.split(".")[:2]) for k in mapped} | {
        ".".join(k.split(".")[:2]) for k in report.reinitialised
    }
    classification = all(k.startswith(body) for k in mapped)
    missing = []
    for key in own:
        if key in mapped or key in report.reinitialised or key.endswith("num_batches_tracked"):
            continue
        part = ".".join(key.split(".")[:2])
        if classification and not key.startswith(body):
            report.reinitialised[key] = "detection layer (classification weights have none)"
        elif part not in from_file:
            report.reinitialised[key] = f"{part}: not in the file; initialised by the builder"
        else:
            missing.append(key)
    if missing:
        raise WeightsError(
            f"{report.file}: {len(missing)} tensor(s) of this model are missing from the "
            f"file: {_names(missing)}; the file is another architecture"
        )


def write_report(report: LoadReport, path: Path) -> Path:
    """The report as JSON (logged with the training run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_json(), indent=2))
    return path


def count_parameters(model: nn.Module) -> int:
    """Number of parameter values (weights and biases; buffers not counted)."""
    return sum(p.numel() for p in model.parameters())
