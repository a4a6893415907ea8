"""Registering a trained, evaluated model: an MLflow pyfunc logged in the run that
trained it, registered as a new version of ``rcnnops-<variant>``, aliased
``challenger``. Idempotent on the weights' content hash.

A model trained against another tracking store (a teammate's run pulled with
DVC into a clone with its own ``mlflow.db``, or a store made anew) has no
training run here: it is logged in a run made for it, which names the run that
trained it (``rcnnops.trained_in_run``) and holds its evaluation metrics.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow

from rcnnops import tracking
from rcnnops.files import sha256_file
from rcnnops.models.io import read_model_meta
from rcnnops.registry.describe import describe
from rcnnops.registry.store import (
    CHALLENGER,
    RegistryError,
    is_decided,
    model_name,
    version_with_hash,
)


@dataclass
class Registered:
    name: str
    version: str
    created: bool  # False when an identical model was already registered
    decided: bool = False  # the gate has already recorded a decision on this version
    trained_in_run: str | None = None  # set when that run is not in this store


def register(
    variant: str,
    model_dir: Path,
    report_dir: Path,
    experiment: str,
    serving: dict | None = None,
) -> Registered:
    """Log the trained model as a pyfunc in its training run and register it.

    ``serving``: how the served model runs, as evaluation did (``serving.json``):
    ``proposals``, the selective-search settings (``SearchSettings.as_dict()``) for
    the variants that need them, and ``svd_rank``.
    Idempotent on the model's content hash: registering the same weights again
    returns the existing version and creates nothing. Refuses (``RegistryError``,
    nothing registered) a ``model.pt`` other than the one ``metrics.json`` measured
    (its ``model_hash``), or a logged model that does not load and predict its input
    example as served (MLflow's check when it logs a model, which only warns).
    """
    from rcnnops import pyfunc, serving_check

    tracking.setup(experiment)
    model_dir, report_dir = Path(model_dir), Path(report_dir)
    meta = read_model_meta(model_dir)
    metrics_path = report_dir / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(
            f"{metrics_path}: no evaluation; run `dvc repro evaluate@{variant}`"
        )
    metrics = json.loads(metrics_path.read_text())
    model_hash = sha256_file(model_dir / "model.pt")
    measured = metrics.get("model_hash")
    if measured != model_hash:
        raise RegistryError(
            f"{metrics_path} was measured on another model.pt (model_hash "
            f"{(measured or 'missing')[:12]}, {model_dir / 'model.pt'} is {model_hash[:12]}); "
            f"nothing registered: rerun `dvc repro evaluate@{variant}` (or `dvc repro "
            f"train@{variant}` if model.pt is damaged)"
        )
    name = model_name(variant)
    serving = serving or {"proposals": None}
    serving_tag = json.dumps(serving, sort_keys=True)
    mv = version_with_hash(name, model_hash, serving_tag)
    if mv is not None:
        decided = is_decided(mv.tags)
        return Registered(name, str(mv.version), created=False, decided=decided)
    numeric = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    run_id = meta["run_id"]
    elsewhere = None if tracking.find_run(run_id) else run_id
    if elsewhere:
        run_id = _run_for_model_from_elsewhere(variant, elsewhere, meta, numeric)
    tags = {
        "variant": variant,
        "model_hash": model_hash,
        "serving": serving_tag,
        "data_hash": meta["data_hash"],
        "val_hash": meta["val_hash"],
        "params_hash": meta["params_hash"],
        "git_commit": meta["git_commit"],
        "run_id": run_id,
        **({"trained_in_run": elsewhere} if elsewhere else {}),
        "train_seconds": str(meta.get("train_seconds", "")),
        "parameters": str(meta.get("parameters", "")),
        **{f"metric.{k}": str(v) for k, v in numeric.items()},
    }
    try:
        with tempfile.TemporaryDirectory() as tmp:
            bundle = serving_check.write_bundle(model_dir, Path(tmp) / "model_dir", serving)
            checked = serving_check.checked(bundle, report_dir / serving_check.CHECK_FILE)
            with tracking.added_to(run_id):
                info = pyfunc.log(bundle, checked=checked)
        mv = mlflow.register_model(info.model_uri, name, tags=tags)
    except BaseException as e:
        if elsewhere:  # nothing registered, and no stray run (a retry makes another)
            tracking.client().delete_run(run_id)
        if isinstance(e, pyfunc.ServingCheckError):
            raise RegistryError(
                f"{model_dir}: the model does not work as served: loaded from its logged "
                f"copy, it failed on the input example ({e}); nothing registered"
            ) from None
        raise
    describe(name, str(mv.version))
    tracking.client().set_registered_model_alias(name, CHALLENGER, mv.version)
    return Registered(name, str(mv.version), created=True, trained_in_run=elsewhere)


def _run_for_model_from_elsewhere(variant: str, source: str, meta: dict, numeric: dict) -> str:
    """A finished run in the active experiment for a model whose training run
    ``source`` is in another store: it names that run, carries the model's lineage
    as tags and its evaluation metrics (``numeric``), and the pyfunc is logged in
    it. Returns its id."""
    lineage = ("data_hash", "val_hash", "params_hash", "git_commit")
    tags = {
        "variant": variant,
        "rcnnops.trained_in_run": source,
        **{k: str(meta[k]) for k in lineage if meta.get(k)},
        "mlflow.note.content": (
            f"`{variant}` was trained in run {source} of another tracking store; its "
            "model was pulled with DVC and registered here. Its training curves and "
            "params are in that run."
        ),
    }
    logged = {k: float(v) for k, v in numeric.items()}
    if isinstance(meta.get("train_seconds"), int | float):
        logged["train_seconds"] = float(meta["train_seconds"])
    with mlflow.start_run(run_name=f"{variant} (trained elsewhere)", tags=tags) as run:
        mlflow.log_metrics(logged)
    return run.info.run_id
