"""A tiny trained, evaluated and registered project for the serving and comparing
tests: the stage functions run in-process (no DVC, no Prefect), real MLflow."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import yaml

from tests.conftest import REPO, TINY_PARAMS

EXPERIMENT = "rcnnops-test"


@contextmanager
def inside(project: Path):
    """cwd = ``project`` and MLflow on its SQLite store, restored afterwards."""
    old_cwd, old_uri = os.getcwd(), os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(project)
    try:
        yield project
    finally:
        os.chdir(old_cwd)
        os.environ.pop("MLFLOW_TRACKING_URI", None)  # whatever the block set
        if old_uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri


def write_project(root: Path, variants: list[str]) -> Path:
    """A project folder like the repo with the tiny params, for ``variants``."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load(TINY_PARAMS)
    params["variants"] = list(variants)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def train_and_register(project: Path, variants: list[str]) -> dict[str, str]:
    """generate -> prepare -> [proposals] -> train -> evaluate -> register -> promote,
    in-process; returns ``{variant: registered version}``."""
    from rcnnops import evaluate, registry, train
    from rcnnops.config import USES_PROPOSALS, load_params
    from rcnnops.data import prepare
    from rcnnops.data.shapes import generate

    versions = {}
    with inside(project):
        p = load_params("params.yaml")
        generate(p.generate)
        prepare.run(p)
        if USES_PROPOSALS & set(variants):
            from rcnnops.proposals import precompute

            precompute.run(p)
        for v in variants:
            train.run(p, v, progress=False)
            evaluate.run(p, v, progress=False)
            r = registry.register_variant(p, v)
            registry.promote_variant(p, v, r.version, actor="test")
            versions[v] = r.version
    return versions
