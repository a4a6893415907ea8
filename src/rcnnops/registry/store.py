"""The MLflow model registry as rcnnops names it: lookups, the registry lock, listing.

Registered models are named ``rcnnops-<variant>``; aliases ``champion`` (serving)
and ``challenger`` (newest candidate). Each version carries lineage tags
(``git_commit``, ``data_hash``, ``val_hash``, ``params_hash``, ``variant``,
``model_hash``, ``run_id``, ``train_seconds``, ``parameters``) and its evaluation
metrics (``metric.<key>``).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import mlflow
from mlflow.exceptions import MlflowException

from rcnnops import tracking
from rcnnops.errors import UserError
from rcnnops.lock import flocked
from rcnnops.user import user_name

CHAMPION, CHALLENGER = "champion", "challenger"
NO_CHAMPION = "none"
LINEAGE = ("git_commit", "data_hash", "val_hash", "params_hash", "model_hash", "run_id")


class RegistryError(UserError, ValueError):
    """A registry request that cannot be done (missing model, version or alias;
    nothing to roll back to). Nothing was changed."""


def model_name(variant: str) -> str:
    return f"rcnnops-{variant}"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def actor_name(who: str | None) -> str:
    """Who made a registry change: ``who``, else ``$RCNNOPS_ACTOR``, else the user."""
    return who or os.environ.get("RCNNOPS_ACTOR") or user_name()


# --- looking things up -------------------------------------------------------------


def versions(name: str) -> list:
    """Every version of registered model ``name`` ([] when it does not exist)."""
    try:
        return tracking.client().search_model_versions(f"name='{name}'")
    except MlflowException:
        return []


def require_model(name: str) -> Any:
    """The registered model ``name``, or a :class:`RegistryError` saying how to make it."""
    try:
        return tracking.client().get_registered_model(name)
    except MlflowException:
        raise RegistryError(
            f"no registered model {name} in {mlflow.get_tracking_uri()}; train and register "
            f"it with `rcnnops run` (or `rcnnops register {name.removeprefix('rcnnops-')}`)"
        ) from None


def get_version(name: str, version: str) -> Any:
    """Model version ``version`` of ``name``; :class:`RegistryError` when either is missing."""
    require_model(name)
    try:
        return tracking.client().get_model_version(name, str(version))
    except MlflowException:
        have = sorted(int(mv.version) for mv in versions(name))
        raise RegistryError(
            f"model {name} has no version {version} (versions: "
            f"{', '.join(map(str, have)) or 'none'})"
        ) from None


def get_alias(name: str, alias: str) -> Any | None:
    try:
        return tracking.client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def resolve(variant: str, alias: str = CHAMPION, experiment: str = "rcnnops") -> Any:
    """The version ``rcnnops-<variant>@<alias>`` points at, or a clear :class:`RegistryError`."""
    tracking.setup(experiment)
    name = model_name(variant)
    model = require_model(name)
    mv = get_alias(name, alias)
    if mv is None:
        have = ", ".join(f"{a}=v{v}" for a, v in sorted((model.aliases or {}).items()))
        raise RegistryError(f"model {name} has no alias {alias!r} (aliases: {have or 'none'})")
    return mv


def model_uri(variant: str, alias: str = CHAMPION) -> str:
    return f"models:/{model_name(variant)}@{alias}"


def load_pyfunc(
    variant: str,
    alias: str = CHAMPION,
    experiment: str = "rcnnops",
    model_config: dict | None = None,
) -> Any:
    """Load ``models:/rcnnops-<variant>@<alias>`` (checked first, for a clear error);
    a version that cannot be loaded (its artifacts gone, say) is a
    :class:`RegistryError` naming it and where its artifacts are."""
    from rcnnops import pyfunc
    from rcnnops.redact import redact

    mv = resolve(variant, alias, experiment)
    try:
        return pyfunc.load(model_uri(variant, alias), model_config)
    except UserError:
        raise
    except Exception as e:
        why = " ".join(str(e).split()) or type(e).__name__
        raise RegistryError(
            f"{mv.name} v{mv.version} ({alias}) cannot be loaded: {type(e).__name__}: "
            f"{why[:300]} (its artifacts: {redact(str(mv.source))})"
        ) from e


def metric_value(mv: Any, key: str) -> float | None:
    """A version's ``metric.<key>`` tag as a number (None when absent or NaN)."""
    raw = mv.tags.get(f"metric.{key}")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def run_metric(run_id: str | None, key: str) -> float | None:
    """The last value of ``key`` logged in MLflow run ``run_id``, if any."""
    if not run_id:
        return None
    try:
        return tracking.client().get_run(run_id).data.metrics.get(key)
    except MlflowException:
        return None


def version_with_hash(name: str, model_hash: str, serving: str | None = None) -> Any | None:
    """The version of ``name`` whose weights have sha256 ``model_hash`` (and, when
    given, whose ``serving`` tag is ``serving``), if any: registration is idempotent
    on both."""
    for mv in versions(name):
        tags = mv.tags or {}
        if tags.get("model_hash") == model_hash and serving in (None, tags.get("serving")):
            return mv
    return None


# --- the lock ----------------------------------------------------------------------


def lock_path(uri: str | None = None) -> Path | None:
    """The lock file for a local store (SQLite file or file store); None for remote ones."""
    uri = uri or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        db = uri.removeprefix("sqlite:///").split("?", 1)[0]
        # the file itself resolved: a clone reaching it through a symlink of another
        # name must take the same lock
        path = Path(unquote(db)).resolve()
        return path.with_name(path.name + ".registry.lock")
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path)).resolve() / ".rcnnops-registry.lock"
    return None


@contextmanager
def registry_lock() -> Iterator[Path | None]:
    """Hold the store's registry lock (no-op for remote stores). ``flock``: it
    excludes other processes and other threads that open the file too."""
    path = lock_path()
    if path is None:
        yield None
        return
    path.parent.mkdir(parents=True, exist_ok=True)

    def waiting() -> None:  # a silent wait looked like a hang
        print(f"waiting for {path}: another promotion or rollback on this store holds it",
              file=sys.stderr, flush=True)  # fmt: skip

    with flocked(path, waiting=waiting):
        yield path


# --- listing -----------------------------------------------------------------------


def is_decided(tags: dict | None) -> bool:
    """The gate has finished deciding on this version (``promoting``: it decided
    to promote, and champion has not moved yet; a rerun completes it)."""
    return (tags or {}).get("promotion.decision") in ("promoted", "kept")


def rolled_back(tags: dict) -> bool:
    """The version's last promotion was rolled back (not one it had before a
    rollback and a promotion again: ``rollback.after_promotion`` names the
    promotion rolled back; records older than that tag count as the last)."""
    if "rollback.demoted_at" not in tags:
        return False
    count = tags.get("promotion.count")
    return tags.get("rollback.after_promotion", count) == count


def decision_text(tags: dict) -> str:
    text = tags.get("promotion.decision", "")
    if rolled_back(tags):
        to = tags.get("rollback.demoted_to", "?")  # (records an interrupted rollback left)
        text = (text + ", " if text else "") + f"rolled back to v{to}"
    return text


def list_versions(variants: list[str] | None = None) -> list[dict]:
    """One row per registered version of the rcnnops models (or of ``variants``):
    aliases, metrics, decision and lineage. Uses the store already set up."""
    client = tracking.client()
    rows = []
    for rm in client.search_registered_models("name LIKE 'rcnnops-%'"):
        if variants and rm.name not in {model_name(v) for v in variants}:
            continue
        aliases: dict[str, list[str]] = {}
        for alias, version in (rm.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for mv in versions(rm.name):
            tags = mv.tags
            rows.append(
                {
                    "model": rm.name,
                    "version": str(mv.version),
                    "aliases": ",".join(sorted(aliases.get(str(mv.version), []))),
                    "bbox_AP": metric_value(mv, "bbox_AP"),
                    "segm_AP": metric_value(mv, "segm_AP"),
                    "decision": decision_text(tags),
                    "reason": tags.get("promotion.reason", ""),
                    "decided_by": tags.get("promotion.by", ""),
                    **{k: tags.get(k, "") for k in LINEAGE if k != "run_id"},
                    "run_id": mv.run_id or tags.get("run_id", ""),
                }
            )
    rows.sort(key=lambda r: (r["model"], int(r["version"])))
    return rows
