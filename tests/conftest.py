"""Shared fixtures: tiny generated datasets and projects (no network, CPU only)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from rcnnops.config import DataParams, GenerateParams, PrepareParams, SplitSource
from rcnnops.data.prepare import prepare
from rcnnops.data.shapes import generate
from rcnnops.telemetry import no_telemetry

no_telemetry()  # before any test imports Prefect, as the rcnnops command does

REPO = Path(__file__).resolve().parents[1]
COCO_MINI = REPO.parent / "shared" / "data" / "coco-mini"

TINY = GenerateParams(
    out="raw",
    num_train=12,
    num_val=6,
    image_size=64,
    min_object_size=12,
    max_object_size=30,
    max_objects=3,
    empty_fraction=0.2,
    seed=1,
)


@pytest.fixture
def tiny_raw(tmp_path, monkeypatch) -> Path:
    """A tiny shapes dataset (64 px) written as COCO under tmp_path/raw."""
    monkeypatch.chdir(tmp_path)
    return generate(TINY.model_copy(update=dict(out=str(tmp_path / "raw"))))


@pytest.fixture
def tiny_prepared(tiny_raw, tmp_path) -> Path:
    """``tiny_raw`` through ``prepare`` into tmp_path/prepared."""
    data = DataParams(
        root=str(tiny_raw),
        train=SplitSource(annotations="annotations/instances_train.json", images="train"),
        val=SplitSource(annotations="annotations/instances_val.json", images="val"),
    )
    prepare(data, PrepareParams(out=str(tmp_path / "prepared")))
    return tmp_path / "prepared"


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


TINY_PARAMS = """\
variants: [rcnn, fast_rcnn, faster_rcnn, mask_rcnn]
data:
  root: data/raw/shapes
  train: {annotations: annotations/instances_train.json, images: train}
  val: {annotations: annotations/instances_val.json, images: val}
generate:
  out: data/raw/shapes
  num_train: 16
  num_val: 8
  image_size: 64
  classes: [circle, square]
  max_objects: 2
  min_object_size: 14
  max_object_size: 30
  empty_fraction: 0.1
  seed: 0
prepare: {out: data/prepared}
proposals: {out: data/proposals, mode: fast, max_boxes: 200, min_size: 6, workers: 1}
train:
  out: models
  device: cpu
  seed: 0
  workers: 0
  log_every: 2
  eval_every: 1
  nproc: 1
  sync_bn: false
  faster_rcnn:
    epochs: 1
    batch_size: 4
    lr: 0.01
    warmup_iters: 2
    lr_steps: []
    model: {backbone: small, min_size: 64, max_size: 64, anchor_sizes: [16, 32],
            roi_op: pool, representation_size: 32, box_batch_size_per_image: 32,
            rpn_pre_nms_top_n_test: 50, rpn_post_nms_top_n_test: 20}
  mask_rcnn:
    epochs: 1
    batch_size: 4
    lr: 0.01
    warmup_iters: 2
    lr_steps: []
    model: {backbone: small, min_size: 64, max_size: 64, anchor_sizes: [16, 32],
            representation_size: 32, box_batch_size_per_image: 32,
            rpn_pre_nms_top_n_test: 50, rpn_post_nms_top_n_test: 20, box_detections_per_img: 20,
            mask_head_channels: 8, mask_head_layers: 1}
  fast_rcnn:
    epochs: 1
    batch_size: 2
    lr: 0.01
    warmup_iters: 2
    lr_steps: []
    model: {backbone: small, min_size: 64, max_size: 64, roi_op: pool,
            representation_size: 32, box_batch_size_per_image: 16}
  rcnn:
    epochs: 1
    batch_size: 2
    lr: 0.01
    warmup_iters: 2
    lr_steps: []
    model: {warp_size: 16, context: 1, width: 8, min_size: 64, max_size: 64,
            representation_size: 32, box_batch_size_per_image: 16}
evaluate: {out: reports, batch_size: 8}
register: {experiment: rcnnops-test, metric: bbox_AP}
"""


@pytest.fixture
def tiny_project(tmp_path) -> Path:
    """A project folder like the repo (dvc.yaml, stage sources) with tiny params."""
    proj = tmp_path / "project"
    proj.mkdir()
    shutil.copy(REPO / "dvc.yaml", proj / "dvc.yaml")
    shutil.copytree(
        REPO / "src", proj / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    (proj / "params.yaml").write_text(TINY_PARAMS)
    return proj


@pytest.fixture(scope="session")
def _empty_mlflow_db(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, migrated once: MLflow's migrations cost about
    2.5 s for every new store."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def mlflow_db(_empty_mlflow_db, tmp_path, monkeypatch) -> Path:
    """A new MLflow SQLite store at ``tmp_path/mlflow.db`` and ``MLFLOW_TRACKING_URI``
    pointing at it: a copy of the migrated empty one, its default experiment's
    artifacts under ``tmp_path`` as a store made there would have them."""
    db = tmp_path / "mlflow.db"
    shutil.copyfile(_empty_mlflow_db, db)
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        con.execute(
            "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
            (str(tmp_path / "mlruns" / "0"),),
        )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    return db


@pytest.fixture(scope="session")
def harness():
    """One Prefect test server for the whole session (its own temporary database):
    starting one costs about 20 s, once per module before."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def _restore_cwd(monkeypatch):
    """Stage code and the CLI chdir into the project; put the cwd back after each test."""
    monkeypatch.chdir(os.getcwd())


@pytest.fixture(autouse=True, scope="session")
def _rcnnops_cache(tmp_path_factory):
    """rcnnops' per-user cache (the empty MLflow store new stores copy) in a folder
    of the session, shared by its tests and the commands they start; not ~/.cache."""
    with pytest.MonkeyPatch.context() as session:
        session.setenv("RCNNOPS_CACHE_DIR", str(tmp_path_factory.mktemp("rcnnops-cache")))
        yield


NAME_VARIABLES = ("LOGNAME", "USER", "LNAME", "USERNAME")  # getpass.getuser() reads these first
NAMELESS_SITE = """
import os, pwd
_real = pwd.getpwuid
def _getpwuid(uid):
    if uid == os.getuid():
        raise KeyError(f"getpwuid(): uid not found: {uid}")
    return _real(uid)
pwd.getpwuid = _getpwuid
"""


@pytest.fixture
def nameless_env(tmp_path) -> dict[str, str]:
    """An environment whose Python processes run as a uid the system cannot name
    (no password-database entry, as under ``docker run -u 1234``; a
    ``sitecustomize`` makes ``pwd.getpwuid`` fail) and no LOGNAME/USER/LNAME/USERNAME."""
    site = tmp_path / "nameless-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NAMELESS_SITE)
    env = {k: v for k, v in os.environ.items() if k not in NAME_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return env
