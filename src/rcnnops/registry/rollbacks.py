"""Rollback: ``champion`` back to the version it replaced, recorded on both.

A rollback writes ``rollback.pending_to`` on the champion before it moves the
alias and removes it when its record is complete; the next rollback finishes
a record an interrupted one left (and does not step back a second time). It
holds the registry lock and verifies its move as promotions do (:mod:`.gate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rcnnops import tracking
from rcnnops.registry.describe import describe
from rcnnops.registry.gate import PENDING, _finish, _move_champion, _set_tags, _version_of
from rcnnops.registry.store import (
    CHAMPION,
    NO_CHAMPION,
    RegistryError,
    actor_name,
    get_alias,
    get_version,
    model_name,
    now,
    registry_lock,
    require_model,
    versions,
)


@dataclass
class Rollback:
    name: str
    from_version: str
    to_version: str
    completed: bool = False  # finished the record an interrupted rollback left


PENDING_ROLLBACK = "rollback.pending_to"


def rollback(variant: str, actor: str | None = None, experiment: str = "rcnnops") -> Rollback:
    """Move ``champion`` back to the version it replaced (the current champion's
    ``promotion.champion_before``). Records ``rollback.*`` tags on both versions;
    rolling back again goes one more step back; a rollback interrupted after the
    alias moved is completed instead (see the module docstring).
    :class:`RegistryError`, with nothing changed, when there is no champion or no
    previous one."""
    tracking.setup(experiment)
    name = model_name(variant)
    with registry_lock():
        require_model(name)
        current = get_alias(name, CHAMPION)
        if current is None:
            raise RegistryError(f"model {name} has no champion; nothing to roll back")
        done = _interrupted_rollbacks(name, current)
        if done is not None:
            return done
        if (current.tags or {}).get("promotion.decision") == PENDING:
            _finish(name, str(current.version))  # champion moved to it: it was promoted
            current = get_version(name, str(current.version))
        previous = current.tags.get("promotion.champion_before", NO_CHAMPION)
        if previous in ("", NO_CHAMPION):
            raise RegistryError(
                f"{name}: champion v{current.version} has no previous champion in its audit "
                "trail (promotion.champion_before); nothing to roll back to"
            )
        if previous == str(current.version):  # a record no promotion writes; refuse a loop
            raise RegistryError(
                f"{name}: champion v{current.version} names itself as the champion before "
                "it (promotion.champion_before); nothing to roll back to"
            )
        try:
            target = get_version(name, previous)
        except RegistryError:
            raise RegistryError(
                f"{name}: the previous champion v{previous} no longer exists; "
                f"promote a version by hand with `rcnnops promote {variant} N --force`"
            ) from None
        _set_tags(name, str(current.version), {PENDING_ROLLBACK: previous})
        moved = _move_champion(name, current, str(target.version))
        if moved is None:
            tracking.client().delete_model_version_tag(name, str(current.version),
                                                       PENDING_ROLLBACK)  # fmt: skip
            raise RegistryError(f"{name}: champion moved while rolling back; nothing changed")
        _record_rollback(name, current, previous, actor)
        if not moved:
            now_champion = _version_of(get_alias(name, CHAMPION))
            raise RegistryError(
                f"{name}: rolled back from v{current.version} to v{previous}, but another "
                f"promotion moved champion to v{now_champion} at the same moment"
            )
    return Rollback(name, str(current.version), str(target.version))


def _record_rollback(name: str, demoted: Any, previous: str, actor: str | None) -> None:
    """The ``rollback.*`` tags of a rollback whose alias has moved: ``demoted_at``
    last (its presence is what counts as rolled back), the pending tag removed."""
    by, when = actor_name(actor), now()
    version = str(demoted.version)
    _set_tags(
        name,
        version,
        {
            "rollback.demoted_by": by,
            "rollback.demoted_to": previous,
            # which promotion was rolled back: a later one makes it history
            "rollback.after_promotion": demoted.tags.get("promotion.count", "0"),
            "rollback.demoted_at": when,
        },
    )
    _set_tags(
        name,
        previous,
        {
            "rollback.restored_by": by,
            "rollback.restored_from": version,
            "rollback.restored_at": when,
        },
    )
    tracking.client().delete_model_version_tag(name, version, PENDING_ROLLBACK)
    describe(name, version)


def _interrupted_rollbacks(name: str, champion: Any) -> Rollback | None:
    """Settle what interrupted rollbacks left (``rollback.pending_to``): one whose
    alias moved gets its record (returned when its target is still champion: the
    rerun completes it instead of stepping back again); one whose alias never
    moved is forgotten."""
    done = None
    for mv in versions(name):
        target = (mv.tags or {}).get(PENDING_ROLLBACK)
        if target is None:
            continue
        if str(mv.version) == str(champion.version):  # the alias never moved
            tracking.client().delete_model_version_tag(name, str(mv.version), PENDING_ROLLBACK)
        elif target == str(champion.version):
            _record_rollback(name, mv, target, None)
            done = Rollback(name, str(mv.version), target, completed=True)
        elif (champion.tags or {}).get("promotion.champion_before") == target:
            _record_rollback(name, mv, target, None)  # moved, then a promotion followed
        else:
            tracking.client().delete_model_version_tag(name, str(mv.version), PENDING_ROLLBACK)
    return done
