"""The promotion gate and promote.

Once the gate has run, a version carries its latest decision (``promotion.decision``,
``promotion.reason``, ``promotion.by``, ``promotion.at``,
``promotion.champion_before``) and every decision ever taken on it
(``promotion.1``, ``promotion.2``, ... as JSON; ``promotion.count``). A decision
is written before ``champion`` moves (``promoting`` until it has). A rollback
adds ``rollback.*`` tags to both versions it touches (:mod:`.rollbacks`).

Concurrency: promote and rollback hold an exclusive file lock next to a local
store (``<db>.registry.lock`` beside a SQLite file, ``.rcnnops-registry.lock`` in
a file store), so racing promotions on one machine run one after the other and
each is decided against the champion the previous one left. A remote store
(MLflow server, database) has no shared lock, and MLflow has no compare-and-set
of an alias: there each move of ``champion`` is verified (the champion is read
again just before the move, and read back after it and once more
:data:`SETTLE_S` later); a move that another promotion overwrote is decided
again against the champion it left. Two promotions started at the same moment
then end on the better version; run promotions from one place (the flow) for a
strict order.

Rollback is :mod:`.rollbacks`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from rcnnops import tracking
from rcnnops.registry.describe import describe
from rcnnops.registry.store import (
    CHAMPION,
    NO_CHAMPION,
    RegistryError,
    actor_name,
    get_alias,
    get_version,
    lock_path,
    metric_value,
    model_name,
    now,
    registry_lock,
    rolled_back,
)

PENDING = "promoting"  # decided to promote, champion not moved yet


def _version_of(mv: Any | None) -> str | None:
    return None if mv is None else str(mv.version)


SETTLE_S = 1.0  # remote stores: a racing move lands within a request's time


def _move_champion(name: str, expected: Any | None, version: str) -> bool | None:
    """Point ``champion`` at ``version`` if it still points at ``expected``; verify.

    True when it points there; None when someone moved it since it was read
    (nothing was set); False when it was set and (remote stores, no lock) another
    move landed over it: ``version`` was champion for a moment, and a promotion
    decided then names it as the champion before (the caller records that, then
    decides again)."""
    if _version_of(get_alias(name, CHAMPION)) != _version_of(expected):
        return None
    tracking.client().set_registered_model_alias(name, CHAMPION, version)
    if _version_of(get_alias(name, CHAMPION)) != version:
        return False
    if lock_path() is None:  # another's move read the old champion before this one
        time.sleep(SETTLE_S)  # and may land after it: look again
        return _version_of(get_alias(name, CHAMPION)) == version
    return True


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
    if champion is not None and str(champion.version) == str(candidate.version):
        # Nothing to decide, forced or not: recording it would make the version its
        # own champion_before, and rollback would "roll back" to itself forever.
        return False, f"version {candidate.version} is already champion" + (
            " (--force changes nothing)" if force else ""
        )
    if force:
        return True, "forced by the user"
    if value is None:
        return False, f"version {candidate.version} has no {metric}; not evaluated"
    if champion is None:
        return True, f"first version with {metric}={value:.4f}: becomes champion"
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


def _record(name: str, version: str, d: Decision, actor: str | None) -> None:
    """Write a decision before anything moves: appended to the version's history
    (``promotion.<n>``, one JSON record per decision, never overwritten, and
    ``promotion.count``), then the latest decision as flat tags. A promotion is
    recorded as ``promoting`` until ``champion`` has moved (see :func:`promote`)."""
    tags = get_version(name, version).tags or {}
    n = int(tags.get("promotion.count", "0"))
    last = json.loads(tags.get(f"promotion.{n}", "{}"))
    if last.get("decision") != PENDING:  # a pending record never took effect: replaced
        n += 1
    entry = {
        "decision": PENDING if d.promoted else "kept",
        "reason": d.reason,
        "by": actor_name(actor),
        "at": now(),
        "champion_before": d.champion_before or NO_CHAMPION,
        "metric": d.metric,
        "value": d.value,
    }
    _set_tags(name, version, {f"promotion.{n}": json.dumps(entry), "promotion.count": str(n)})
    _set_tags(
        name,
        version,
        {
            "promotion.decision": entry["decision"],
            "promotion.reason": d.reason,
            "promotion.by": entry["by"],
            "promotion.at": entry["at"],
            "promotion.champion_before": entry["champion_before"],
        },
    )
    describe(name, version)


def _finish(name: str, version: str) -> None:
    """``champion`` has moved: the pending record becomes ``promoted``."""
    tags = get_version(name, version).tags or {}
    n = tags.get("promotion.count")
    if n and f"promotion.{n}" in tags:
        entry = json.loads(tags[f"promotion.{n}"]) | {"decision": "promoted"}
        _set_tags(name, version, {f"promotion.{n}": json.dumps(entry)})
    _set_tags(name, version, {"promotion.decision": "promoted"})
    describe(name, version)


def _pending(candidate: Any, champion: Any | None, metric: str) -> Decision | None:
    """The decision an interrupted promotion of ``candidate`` recorded, if it was
    taken against the champion that is still in place (so it only has to move)."""
    tags = candidate.tags or {}
    if tags.get("promotion.decision") != PENDING or rolled_back(tags):
        return None  # (a rolled-back promotion is not completed: it is decided again)
    if tags.get("promotion.champion_before") != (_version_of(champion) or NO_CHAMPION):
        return None  # the champion changed since: decide again
    return Decision(
        candidate.name, str(candidate.version), True,
        tags.get("promotion.reason", "") + " (completing an interrupted promotion)",
        metric, metric_value(candidate, metric), _version_of(champion),
        metric_value(champion, metric) if champion else None,
    )  # fmt: skip


def promote(
    variant: str,
    version: str,
    metric: str = "bbox_AP",
    min_improvement: float = 0.0,
    force: bool = False,
    actor: str | None = None,
    experiment: str = "rcnnops",
) -> Decision:
    """Run the gate for ``version``; move ``champion`` if it passes.

    The decision is written first (reason, metrics compared, who decided, the
    champion before; appended to the version's history) and the alias moved
    last, so a failure in between leaves a ``promoting`` record that the next
    call completes instead of deciding again; a failure before leaves the
    champion as it was. Serialised with :func:`registry_lock`; raises
    :class:`RegistryError` (nothing changed) for a missing model or version."""
    tracking.setup(experiment)
    name = model_name(variant)
    with registry_lock():
        for _attempt in range(3):
            candidate = get_version(name, version)
            version = str(candidate.version)  # "03" (as typed) is "3": compared below
            champion = get_alias(name, CHAMPION)
            if _version_of(champion) == str(version):
                tags = candidate.tags or {}
                if tags.get("promotion.decision") == PENDING:
                    _finish(name, str(version))  # the alias moved, the record did not
                    return Decision(
                        name, version, True, tags.get("promotion.reason", "")
                        + " (completing an interrupted promotion)", metric,
                        metric_value(candidate, metric), tags.get("promotion.champion_before"),
                        None,
                    )  # fmt: skip
                # already champion: nothing decided, the audit trail is kept
                return _decision(candidate, champion, metric, min_improvement, force)
            decision = _pending(candidate, champion, metric)
            if decision is None:
                decision = _decision(candidate, champion, metric, min_improvement, force)
                _record(name, str(version), decision, actor)
            if not decision.promoted:
                return decision
            moved = _move_champion(name, champion, str(version))
            if moved is not None:  # it was champion, if only for a moment: recorded
                _finish(name, str(version))
            if moved:
                return decision
        raise RegistryError(f"{name}: champion kept moving while v{version} was decided")


def decision_dict(d: Decision) -> dict:
    return asdict(d)
