"""Making a moved or copied project use its own MLflow artifacts (``rcnnops relocate``).

The default tracking store is ``mlflow.db`` in the project, found relative to the
project wherever it is. But MLflow records every artifact location as an
absolute URI (the experiment's root, each run's, each logged model's, each model
version's storage location), so after ``mv project elsewhere`` the registry
points at files that are gone, and after ``cp -r project copy`` the copy reads
and writes the *original's* ``mlartifacts/``. This rewrites those locations from
the old project folder to this one, in one SQLite transaction, and says what it
changed. Only the default SQLite store is concerned: a tracking server owns its
artifact store.
"""

from __future__ import annotations

import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

from rcnnops.errors import UserError

# (table, column) pairs of MLflow's SQL schema that hold artifact locations.
LOCATIONS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
)


class RelocateError(UserError, RuntimeError):
    pass


@dataclass
class Relocation:
    old: Path | None  # the project folder the store pointed at (None: already here)
    new: Path
    changed: dict[str, int]


def _roots(db: sqlite3.Connection, artifacts: str) -> set[Path]:
    """Project folders the store's experiment roots name (``<root>/<artifacts>``)."""
    roots = set()
    for (location,) in db.execute("SELECT artifact_location FROM experiments"):
        path = Path(str(location).removeprefix("file://"))
        if path.name == artifacts:
            roots.add(path.parent)
    return roots


def recorded_root(project: Path, db_name: str, artifacts: str) -> Path | None:
    """The project folder the store's artifacts are recorded under, when that is
    not ``project`` (None when they are here, or the store is empty)."""
    project = Path(project).resolve()
    db_path = project / db_name
    if not db_path.is_file():
        return None
    with sqlite3.connect(db_path) as db:
        try:
            roots = _roots(db, artifacts) - {project}
        except sqlite3.Error:
            return None
    return next(iter(sorted(roots)), None)


def relocate(project: Path, db_name: str, artifacts: str) -> Relocation:
    """Rewrite the store's artifact locations from the recorded project folder to
    ``project``; a no-op when they already point here."""
    project = Path(project).resolve()
    db_path = project / db_name
    if not db_path.is_file():
        raise RelocateError(f"{db_path}: no MLflow store here (nothing to relocate)")
    with sqlite3.connect(db_path) as db:
        roots = _roots(db, artifacts) - {project}
        if len(roots) > 1:
            raise RelocateError(
                f"{db_path} records artifacts under several folders "
                f"({', '.join(map(str, sorted(roots)))}); relocate by hand"
            )
        if not roots:
            return Relocation(None, project, {})
        (old,) = roots
        changed = {}
        for table, column in LOCATIONS:
            total = 0
            for before, after in ((old.as_uri(), project.as_uri()), (str(old), str(project))):
                prefix = before + "/"
                cur = db.execute(
                    f'UPDATE "{table}" SET "{column}" = ? || substr("{column}", ?) '  # noqa: S608
                    f'WHERE substr("{column}", 1, ?) = ?',
                    (after + "/", len(prefix) + 1, len(prefix), prefix),
                )
                total += cur.rowcount
            changed[f"{table}.{column}"] = total
    return Relocation(old, project, changed)


def warn_if_elsewhere(project: Path, db_name: str, artifacts: str) -> None:
    """One line on stderr when the store's artifacts are recorded in another folder."""
    old = recorded_root(project, db_name, artifacts)
    if old is not None:
        print(
            f"warning: {db_name} records its artifacts under {old}/{artifacts}, not this "
            f"project's (was it moved or copied?); run `rcnnops relocate` so it uses its own",
            file=sys.stderr,
        )
