"""All MLflow model-registry code: the pyfunc wrapper, register, promote, load.

Registered models are named ``rcnnops-<variant>``. Aliases: ``champion``
(serving) and ``challenger`` (newest candidate). Each version carries lineage
tags (``git_commit``, ``data_hash``, ``val_hash``, ``params_hash``,
``variant``, ``model_hash``) and, once the gate has run, its decision
(``promotion.decision``, ``promotion.reason``, ...).
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
from mlflow.exceptions import MlflowException

from rcnnops import tracking

CHAMPION, CHALLENGER = "champion", "challenger"


def model_name(variant: str) -> str:
    return f"rcnnops-{variant}"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class DetectorPyfunc(mlflow.pyfunc.PythonModel):
    """Images in, detections out.

    Input: a DataFrame with an ``image`` column of base64-encoded image files
    (PNG/JPEG...). Output: one dict per image with ``boxes`` (xyxy pixels),
    ``labels``, ``names`` and ``scores``, keeping scores >= the
    ``score_threshold`` param (default 0.5).
    """

    def load_context(self, context: Any) -> None:
        from rcnnops.train import load_model

        self.model, self.meta = load_model(Path(context.artifacts["model_dir"]), "cpu")
        from rcnnops.data.coco import LabelMap

        self.labels = LabelMap.from_json(self.meta["labels"])

    def predict(self, context, model_input, params=None):  # no hints: MLflow reads them as schema
        import numpy as np
        import torch
        from PIL import Image

        threshold = float((params or {}).get("score_threshold", 0.5))
        column = model_input["image"] if hasattr(model_input, "columns") else model_input
        images = []
        for i, value in enumerate(list(column)):
            try:
                raw = base64.b64decode(value, validate=True)
                with Image.open(io.BytesIO(raw)) as im:
                    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
            except Exception as e:
                raise ValueError(f"input row {i}: not a base64-encoded image ({e})") from None
            images.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0)
        with torch.no_grad():
            outputs = self.model(images)
        detections = []
        for out in outputs:
            keep = out["scores"] >= threshold
            labels = out["labels"][keep].tolist()
            detections.append(
                {
                    "boxes": [[round(v, 2) for v in b] for b in out["boxes"][keep].tolist()],
                    "labels": labels,
                    "names": [self.labels.name(lab) for lab in labels],
                    "scores": [round(s, 4) for s in out["scores"][keep].tolist()],
                }
            )
        return detections


@dataclass
class Registered:
    name: str
    version: str
    created: bool  # False when an identical model was already registered


def _versions(name: str) -> list:
    try:
        return tracking.client().search_model_versions(f"name='{name}'")
    except MlflowException:
        return []


def register(variant: str, model_dir: Path, report_dir: Path, experiment: str) -> Registered:
    """Log the trained model as a pyfunc in its training run and register it.

    Idempotent on the model's content hash: registering the same weights again
    returns the existing version and creates nothing.
    """
    tracking.setup(experiment)
    model_dir, report_dir = Path(model_dir), Path(report_dir)
    from rcnnops.train import read_model_meta

    meta = read_model_meta(model_dir)
    metrics_path = report_dir / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(
            f"{metrics_path}: no evaluation; run `dvc repro evaluate@{variant}`"
        )
    metrics = json.loads(metrics_path.read_text())
    model_hash = file_sha256(model_dir / "model.pt")
    name = model_name(variant)
    for mv in _versions(name):
        if mv.tags.get("model_hash") == model_hash:
            return Registered(name, str(mv.version), created=False)
    client = tracking.client()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "model_dir"
        bundle.mkdir()
        for f in ("model.pt", "model.json"):
            shutil.copy2(model_dir / f, bundle / f)
        with mlflow.start_run(run_id=meta["run_id"]):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=DetectorPyfunc(),
                artifacts={"model_dir": str(bundle)},
                pip_requirements=_requirements(),
                signature=_signature(),
            )
    numeric = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    tags = {
        "variant": variant,
        "model_hash": model_hash,
        "data_hash": meta["data_hash"],
        "val_hash": meta["val_hash"],
        "params_hash": meta["params_hash"],
        "git_commit": meta["git_commit"],
        "run_id": meta["run_id"],
        **{f"metric.{k}": str(v) for k, v in numeric.items()},
    }
    mv = mlflow.register_model(info.model_uri, name, tags=tags)
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    return Registered(name, str(mv.version), created=True)


def _signature():
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image")]),
        params=ParamSchema([ParamSpec("score_threshold", "double", 0.5)]),
    )


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "torchvision", "mlflow", "pillow")]


@dataclass
class Decision:
    name: str
    version: str
    promoted: bool
    reason: str
    metric: str
    value: float | None
    champion_before: str | None
    champion_value: float | None


def _metric(mv: Any, metric: str) -> float | None:
    raw = mv.tags.get(f"metric.{metric}")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def get_alias(name: str, alias: str) -> Any | None:
    try:
        return tracking.client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def decide(
    candidate: Any, champion: Any | None, metric: str, min_improvement: float, force: bool = False
) -> tuple[bool, str]:
    """The promotion gate, as a pure decision over two model versions."""
    value = _metric(candidate, metric)
    if force:
        return True, "forced by the user"
    if value is None:
        return False, f"version {candidate.version} has no {metric}; not evaluated"
    if champion is None:
        return True, f"first version with {metric}={value:.4f}: becomes champion"
    if str(champion.version) == str(candidate.version):
        return False, f"version {candidate.version} is already champion"
    if champion.tags.get("val_hash") != candidate.tags.get("val_hash"):
        return False, (
            f"validation data differs from champion v{champion.version}'s "
            "(val_hash); refusing to compare, champion kept (use --force)"
        )
    best = _metric(champion, metric)
    if best is None:
        return True, f"champion v{champion.version} has no {metric}"
    if value > best + min_improvement:
        return True, f"{metric} {value:.4f} beats champion v{champion.version}'s {best:.4f}"
    return False, (
        f"{metric} {value:.4f} does not beat champion v{champion.version}'s "
        f"{best:.4f} by more than {min_improvement}"
    )


def promote(
    variant: str,
    version: str,
    metric: str = "bbox_AP",
    min_improvement: float = 0.0,
    force: bool = False,
    actor: str | None = None,
    experiment: str = "rcnnops",
) -> Decision:
    """Run the gate for ``version``; move ``champion`` if it passes. Records the
    decision, its reason, the metrics compared and who decided as version tags."""
    tracking.setup(experiment)
    client = tracking.client()
    name = model_name(variant)
    try:
        candidate = client.get_model_version(name, str(version))
    except MlflowException:
        raise ValueError(f"model {name} has no version {version}") from None
    champion = get_alias(name, CHAMPION)
    promoted, reason = decide(candidate, champion, metric, min_improvement, force)
    decision = Decision(
        name,
        str(version),
        promoted,
        reason,
        metric,
        _metric(candidate, metric),
        str(champion.version) if champion else None,
        _metric(champion, metric) if champion else None,
    )
    if champion is not None and str(champion.version) == str(version) and not force:
        return decision  # already champion: nothing decided, the audit trail is kept
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, str(version))
    actor = actor or os.environ.get("RCNNOPS_ACTOR") or getpass.getuser()
    tags = {
        "promotion.decision": "promoted" if promoted else "kept",
        "promotion.reason": reason,
        "promotion.by": actor,
        "promotion.at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "promotion.champion_before": decision.champion_before or "none",
    }
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, v)
    return decision


def decision_dict(d: Decision) -> dict:
    return asdict(d)
