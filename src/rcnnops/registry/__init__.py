"""The model registry service: register, promote, roll back and list rcnnops models.

The one service both the CLI (``rcnnops register | promote | rollback | models``)
and the Prefect flow's tasks call: ``*_variant`` functions take the project's
:class:`~rcnnops.config.Params` and a variant and do the rest the same way for
both. The parts: :mod:`.store` (names, lookups, lock, listing),
:mod:`.registration` (pyfunc + new version), :mod:`.gate` (promotion decision,
promote, rollback).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rcnnops.registry.gate import Decision, decide, decision_dict, promote
from rcnnops.registry.registration import Registered, register
from rcnnops.registry.rollbacks import Rollback, rollback
from rcnnops.registry.store import (
    CHALLENGER,
    CHAMPION,
    NO_CHAMPION,
    RegistryError,
    get_alias,
    get_version,
    list_versions,
    load_pyfunc,
    lock_path,
    metric_value,
    model_name,
    model_uri,
    registry_lock,
    resolve,
    run_metric,
    version_with_hash,
    versions,
)

__all__ = [
    "CHALLENGER", "CHAMPION", "NO_CHAMPION", "Decision", "Registered", "RegistryError",
    "Rollback", "decide", "decision_dict", "get_alias", "get_version", "list_versions",
    "load_pyfunc", "lock_path", "metric_value", "model_name", "model_uri", "promote",
    "promote_variant", "register", "register_variant", "registry_lock", "resolve",
    "rollback", "rollback_variant", "run_metric", "serving_settings", "version_with_hash",
    "versions", "warm_up",
]  # fmt: skip


def serving_settings(params: Any, variant: str) -> dict:
    """See :func:`rcnnops.serving_check.serving_settings` (loaded when asked for)."""
    from rcnnops import serving_check

    return serving_check.serving_settings(params, variant)


def register_variant(params: Any, variant: str) -> Registered:
    """Register the project's trained and evaluated ``variant`` (idempotent)."""
    return register(
        variant,
        Path(params.train.out) / variant,
        Path(params.evaluate.out) / variant,
        params.register.experiment,
        serving=serving_settings(params, variant),
    )


def promote_variant(
    params: Any, variant: str, version: str, force: bool = False, actor: str | None = None
) -> Decision:
    """Run the promotion gate for ``version`` with the project's metric and margin."""
    return promote(
        variant,
        version,
        params.register.metric_for(variant),
        params.register.min_improvement,
        force=force,
        actor=actor,
        experiment=params.register.experiment,
    )


def warm_up() -> None:
    """Load now the modules registering and promoting would first load then (MLflow's
    model logging, about a second); the flow does this beside the data stages. The
    model itself is not loaded: the evaluate stage checked it as served
    (:func:`rcnnops.serving_check.check`). Only an optimisation: a module that fails to load
    here fails registration with its own error later."""
    import contextlib
    import importlib

    modules = ["mlflow.models", "mlflow.models.signature", "mlflow.models.utils"]
    modules += ["mlflow.pyfunc.model", "mlflow.types.schema", "mlflow.utils.environment"]
    for name in modules:
        with contextlib.suppress(Exception):
            importlib.import_module(name)


def rollback_variant(params: Any, variant: str, actor: str | None = None) -> Rollback:
    """Move ``champion`` back to the version it replaced."""
    return rollback(variant, actor=actor, experiment=params.register.experiment)
