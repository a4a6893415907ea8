"""All MLflow model-registry code: register, promote, rollback, look up and load.

Registered models are named ``rcnnops-<variant>``. Aliases: ``champion``
(serving) and ``challenger`` (newest candidate). Each version carries lineage
tags (``git_commit``, ``data_hash``, ``val_hash``, ``params_hash``,
``variant``, ``model_hash``, ``run_id``, ``train_seconds``, ``parameters``),
its evaluation metrics (``metric.<key>``) and, once the gate has run, its
decision (``promotion.decision``, ``promotion.reason``, ``promotion.by``,
``promotion.at``, ``promotion.champion_before``). A rollback adds
``rollback.*`` tags to both versions it touches.

Concurrency: promote and rollback hold an exclusive file lock next to a local
store (``<db>.registry.lock`` beside a SQLite file, ``.rcnnops-registry.lock`` in
a file store), so racing promotions on one machine run one after the other and
each is decided against the champion the previous one left. A remote store
(MLflow server, database) has no shared lock: there each move of ``champion``
is re-read and verified (the champion is read again just before the move, the
decision is retaken if it changed, and the alias is read back after), which
narrows the race to a window of milliseconds; run promotions from one place
(the flow) for a strict order.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import mlflow
from mlflow.exceptions import MlflowException

from rcnnops import tracking

CHAMPION, CHALLENGER = "champion", "challenger"
NO_CHAMPION = "none"
LINEAGE = ("git_commit", "data_hash", "val_hash", "params_hash", "model_hash", "run_id")


class RegistryError(ValueError):
    """A registry request that cannot be done (missing model, version or alias;
    nothing to roll back to). Nothing was changed."""


def model_name(variant: str) -> str:
    return f"rcnnops-{variant}"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _actor(actor: str | None) -> str:
    return actor or os.environ.get("RCNNOPS_ACTOR") or getpass.getuser()


# --- looking things up -------------------------------------------------------------


def _versions(name: str) -> list:
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
        have = sorted(int(mv.version) for mv in _versions(name))
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
    """Load ``models:/rcnnops-<variant>@<alias>`` (checked first, for a clear error)."""
    resolve(variant, alias, experiment)
    return mlflow.pyfunc.load_model(model_uri(variant, alias), model_config=model_config)


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


# --- registering -------------------------------------------------------------------


@dataclass
class Registered:
    name: str
    version: str
    created: bool  # False when an identical model was already registered
    decided: bool = False  # the gate has already recorded a decision on this version


def _bundle(model_dir: Path, dest: Path, proposals: dict | None) -> Path:
    """The weights bundle the pyfunc loads: model.pt, model.json, serving.json."""
    dest.mkdir()
    for f in ("model.pt", "model.json"):
        shutil.copy2(model_dir / f, dest / f)
    (dest / "serving.json").write_text(json.dumps({"proposals": proposals}, indent=2))
    return dest


def register(
    variant: str,
    model_dir: Path,
    report_dir: Path,
    experiment: str,
    proposals: dict | None = None,
) -> Registered:
    """Log the trained model as a pyfunc in its training run and register it.

    ``proposals``: the selective-search settings (``SearchSettings.as_dict()``) the
    served model computes proposals with, for the variants that need them.
    Idempotent on the model's content hash: registering the same weights again
    returns the existing version and creates nothing.
    """
    from rcnnops import pyfunc
    from rcnnops.train import read_model_meta

    tracking.setup(experiment)
    model_dir, report_dir = Path(model_dir), Path(report_dir)
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
            decided = "promotion.decision" in (mv.tags or {})
            return Registered(name, str(mv.version), created=False, decided=decided)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = _bundle(model_dir, Path(tmp) / "model_dir", proposals)
        with mlflow.start_run(run_id=meta["run_id"]):
            info = pyfunc.log(bundle)
    numeric = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    tags = {
        "variant": variant,
        "model_hash": model_hash,
        "data_hash": meta["data_hash"],
        "val_hash": meta["val_hash"],
        "params_hash": meta["params_hash"],
        "git_commit": meta["git_commit"],
        "run_id": meta["run_id"],
        "train_seconds": str(meta.get("train_seconds", "")),
        "parameters": str(meta.get("parameters", "")),
        **{f"metric.{k}": str(v) for k, v in numeric.items()},
    }
    mv = mlflow.register_model(info.model_uri, name, tags=tags)
    tracking.client().set_registered_model_alias(name, CHALLENGER, mv.version)
    return Registered(name, str(mv.version), created=True)


# --- the lock ----------------------------------------------------------------------


def lock_path(uri: str | None = None) -> Path | None:
    """The lock file for a local store (SQLite file or file store); None for remote ones."""
    uri = uri or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        db = uri.removeprefix("sqlite:///").split("?", 1)[0]
        return Path(unquote(db)).resolve().with_name(Path(db).name + ".registry.lock")
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
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield path
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _version_of(mv: Any | None) -> str | None:
    return None if mv is None else str(mv.version)


def _move_champion(name: str, expected: Any | None, version: str) -> bool:
    """Point ``champion`` at ``version`` if it still points at ``expected``; verify.

    False when someone moved it since it was read (the caller decides again)."""
    if _version_of(get_alias(name, CHAMPION)) != _version_of(expected):
        return False
    tracking.client().set_registered_model_alias(name, CHAMPION, version)
    now = _version_of(get_alias(name, CHAMPION))
    if now != version:
        raise RegistryError(
            f"{name}: another promotion moved champion to v{now} at the same time as this "
            f"one (v{version}); nothing recorded for v{version}, run the promotion again"
        )
    return True


# --- the gate ----------------------------------------------------------------------


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


def decide(
    candidate: Any, champion: Any | None, metric: str, min_improvement: float, force: bool = False
) -> tuple[bool, str]:
    """The promotion gate, as a pure decision over two model versions."""
    value = metric_value(candidate, metric)
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
    best = metric_value(champion, metric)
    if best is None:
        return True, f"champion v{champion.version} has no {metric}"
    if value > best + min_improvement:
        return True, f"{metric} {value:.4f} beats champion v{champion.version}'s {best:.4f}"
    return False, (
        f"{metric} {value:.4f} does not beat champion v{champion.version}'s "
        f"{best:.4f} by more than {min_improvement}"
    )


def _decision(candidate: Any, champion: Any | None, metric: str, mi: float, force: bool):
    promoted, reason = decide(candidate, champion, metric, mi, force)
    return Decision(
        candidate.name,
        str(candidate.version),
        promoted,
        reason,
        metric,
        metric_value(candidate, metric),
        _version_of(champion),
        metric_value(champion, metric) if champion else None,
    )


def _set_tags(name: str, version: str, tags: dict[str, str]) -> None:
    client = tracking.client()
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, v)


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
    decision, its reason, the metrics compared and who decided as version tags.

    Serialised with :func:`registry_lock`; raises :class:`RegistryError` (nothing
    changed) for a missing model or version."""
    tracking.setup(experiment)
    name = model_name(variant)
    with registry_lock():
        candidate = get_version(name, version)
        for _attempt in range(3):
            champion = get_alias(name, CHAMPION)
            decision = _decision(candidate, champion, metric, min_improvement, force)
            if _version_of(champion) == str(version) and not force:
                return decision  # already champion: nothing decided, the audit trail is kept
            if not decision.promoted or _move_champion(name, champion, str(version)):
                break
        else:
            raise RegistryError(f"{name}: champion kept moving while v{version} was decided")
        _set_tags(
            name,
            str(version),
            {
                "promotion.decision": "promoted" if decision.promoted else "kept",
                "promotion.reason": decision.reason,
                "promotion.by": _actor(actor),
                "promotion.at": _now(),
                "promotion.champion_before": decision.champion_before or NO_CHAMPION,
            },
        )
    return decision


def decision_dict(d: Decision) -> dict:
    return asdict(d)


@dataclass
class Rollback:
    name: str
    from_version: str
    to_version: str


def rollback(variant: str, actor: str | None = None, experiment: str = "rcnnops") -> Rollback:
    """Move ``champion`` back to the version it replaced (the current champion's
    ``promotion.champion_before``). Records ``rollback.*`` tags on both versions;
    rolling back again goes one more step back. :class:`RegistryError`, with
    nothing changed, when there is no champion or no previous one."""
    tracking.setup(experiment)
    name = model_name(variant)
    with registry_lock():
        require_model(name)
        current = get_alias(name, CHAMPION)
        if current is None:
            raise RegistryError(f"model {name} has no champion; nothing to roll back")
        previous = current.tags.get("promotion.champion_before", NO_CHAMPION)
        if previous in ("", NO_CHAMPION):
            raise RegistryError(
                f"{name}: champion v{current.version} has no previous champion in its audit "
                "trail (promotion.champion_before); nothing to roll back to"
            )
        try:
            target = get_version(name, previous)
        except RegistryError:
            raise RegistryError(
                f"{name}: the previous champion v{previous} no longer exists; "
                f"promote a version by hand with `rcnnops promote {variant} N --force`"
            ) from None
        if not _move_champion(name, current, str(target.version)):
            raise RegistryError(f"{name}: champion moved while rolling back; nothing changed")
        who, when = _actor(actor), _now()
        _set_tags(
            name,
            str(current.version),
            {
                "rollback.demoted_at": when,
                "rollback.demoted_by": who,
                "rollback.demoted_to": previous,
            },
        )
        _set_tags(
            name,
            previous,
            {
                "rollback.restored_at": when,
                "rollback.restored_by": who,
                "rollback.restored_from": str(current.version),
            },
        )
    return Rollback(name, str(current.version), str(target.version))


# --- listing -----------------------------------------------------------------------


def _decision_text(tags: dict) -> str:
    text = tags.get("promotion.decision", "")
    if "rollback.demoted_at" in tags:
        text = (text + ", " if text else "") + f"rolled back to v{tags['rollback.demoted_to']}"
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
        for mv in _versions(rm.name):
            tags = mv.tags
            rows.append(
                {
                    "model": rm.name,
                    "version": str(mv.version),
                    "aliases": ",".join(sorted(aliases.get(str(mv.version), []))),
                    "bbox_AP": metric_value(mv, "bbox_AP"),
                    "segm_AP": metric_value(mv, "segm_AP"),
                    "decision": _decision_text(tags),
                    "reason": tags.get("promotion.reason", ""),
                    "decided_by": tags.get("promotion.by", ""),
                    **{k: tags.get(k, "") for k in LINEAGE if k != "run_id"},
                    "run_id": mv.run_id or tags.get("run_id", ""),
                }
            )
    rows.sort(key=lambda r: (r["model"], int(r["version"])))
    return rows
