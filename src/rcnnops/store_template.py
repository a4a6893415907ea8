"""A new SQLite tracking store as a copy of an empty one MLflow migrated once.

MLflow makes a new SQLite store by creating its tables and running its
migrations, about 1.3-1.6 s of CPU on this project's 2-core VM, for every new
project (and every test that makes one). :func:`empty_store` has MLflow do that
once per machine and MLflow schema, in rcnnops' cache (:func:`cache_dir`);
:func:`start_from_template`, called by :func:`rcnnops.tracking.setup`, copies it
where a new store is to be. MLflow is imported only when a store is made.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def cache_dir() -> Path:
    """rcnnops' per-user cache: ``$RCNNOPS_CACHE_DIR``, else ``$XDG_CACHE_HOME/rcnnops``
    (``~/.cache/rcnnops``). Only things any project can rebuild go there."""
    if os.environ.get("RCNNOPS_CACHE_DIR"):
        return Path(os.environ["RCNNOPS_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "rcnnops"


def sqlite_file(uri: str) -> Path | None:
    """The file of a plain SQLite URI (``sqlite:///rel.db``, ``sqlite:////abs.db``);
    None for other stores, in-memory databases, query strings and ``file:`` URIs."""
    if not uri.startswith("sqlite:///") or "?" in uri:
        return None
    path = uri[len("sqlite:///") :]
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    return Path(path).resolve()


def empty_store() -> Path:
    """An empty SQLite tracking store at MLflow's schema: its tables made and
    migrated as MLflow makes a new store's, no rows but the schema version (no
    default experiment: its artifact location belongs to each store). Made once
    per machine and MLflow schema in :func:`cache_dir`, then reused (the Docker
    image makes it when it is built)."""
    import mlflow
    import sqlalchemy
    from mlflow.store.db.utils import _get_latest_schema_revision, _initialize_tables

    folder = cache_dir() / "mlflow-store"
    path = folder / f"empty-mlflow-{mlflow.__version__}-{_get_latest_schema_revision()}.db"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / f".{path.name}.{os.getpid()}.part"
    part.unlink(missing_ok=True)
    try:
        engine = sqlalchemy.create_engine(f"sqlite:///{part}")
        try:
            _initialize_tables(engine)
        finally:
            engine.dispose()
        os.replace(part, path)  # whole or not at all; another process's copy is the same
    finally:
        part.unlink(missing_ok=True)  # only still there if something failed
    return path


def start_from_template(uri: str) -> bool:
    """Start a new SQLite store as a copy of :func:`empty_store` instead of
    MLflow's migrations (1.3-1.6 s of CPU for every new store on this project's
    2-core VM; 0.05 s to open the copy). Only ever makes a file where none is: an
    existing store, another process's store made meanwhile, or a store that is not
    a plain SQLite file is left to MLflow. Only an optimisation: if anything fails
    (MLflow's private helpers moved, the cache is not writable), MLflow makes the
    store as before. Returns whether the store was made from the template."""
    path = sqlite_file(uri)
    if path is None or path.exists() or not path.parent.is_dir():
        return False  # (a missing folder: MLflow's own error, as before)
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        template = empty_store()
        shutil.copyfile(template, part)
        os.link(part, path)  # fails if the store appeared meanwhile: never replaces one
        return True
    except Exception:  # noqa: BLE001 - see the docstring
        return False
    finally:
        part.unlink(missing_ok=True)
