"""Helpers for tests that run the real training stage: tiny projects, the
``rcnnops train`` command in a subprocess, its MLflow run and its weights."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from rcnnops.cli import main
from tests.conftest import TINY_PARAMS

VARIANT = "faster_rcnn"
EXPERIMENT = "rcnnops-test"


def tiny_params(
    common: dict | None = None, generate: dict | None = None, experiment: str = EXPERIMENT, **train
) -> dict:
    """TINY_PARAMS as a dict: ``train`` updates the faster_rcnn section (``model=``
    its model), ``common`` the shared train keys, ``generate`` the dataset."""
    p = yaml.safe_load(TINY_PARAMS)
    p["generate"].update(generate or {})
    p["train"].update(common or {})
    p["register"]["experiment"] = experiment
    section = p["train"][VARIANT]
    section["model"].update(train.pop("model", {}))
    section.update(train)
    return p


def make_project(root: Path, params: dict, data_from: Path | None = None) -> Path:
    """A project folder with ``params`` and prepared data (generated and prepared
    here, or copied from the project ``data_from``)."""
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    if data_from is not None:
        shutil.copytree(data_from / "data", root / "data")
    else:
        assert main(["-C", str(root), "generate"]) == 0
        assert main(["-C", str(root), "prepare"]) == 0
    return root


def child_env() -> dict[str, str]:
    """The test's environment minus anything that would redirect the child
    (its MLflow store is the project's sqlite file; no inherited torchrun world)."""
    drop = {"MLFLOW_TRACKING_URI", "WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def start_training(project: Path, log: Path) -> subprocess.Popen:
    """``rcnnops train --variant faster_rcnn`` in ``project`` (output to ``log``),
    in a session of its own so that a test can kill everything it started."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "rcnnops.cli", "train", "--variant", VARIANT, "--no-progress"],
            cwd=project,
            env=child_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def train(project: Path, timeout: float = 600) -> str:
    """Run the training to completion; returns its output."""
    log = project / f"train-{time.monotonic_ns()}.log"
    proc = start_training(project, log)
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = log.read_text()
    assert code == 0, out
    return out


def use_store(path: Path, monkeypatch) -> str:
    """Point in-process MLflow at the sqlite file ``path``, as a user's
    ``MLFLOW_TRACKING_URI`` does (whatever the test's working directory)."""
    uri = f"sqlite:///{path}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def client(store: Path):
    """An MLflow client on a project folder's ``mlflow.db``, or on a sqlite file."""
    from mlflow import MlflowClient

    db = store / "mlflow.db" if store.is_dir() else store
    return MlflowClient(f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")


def runs(store: Path, experiment: str = EXPERIMENT) -> list:
    c = client(store)
    exp = c.get_experiment_by_name(experiment)
    return [] if exp is None else c.search_runs([exp.experiment_id])


def histories(store: Path, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric of the run as ``[(step, value), ...]`` sorted by step
    (a step logged twice shows up twice)."""
    c = client(store)
    keys = c.get_run(run_id).data.metrics
    return {k: sorted((m.step, m.value) for m in c.get_metric_history(run_id, k)) for k in keys}


def model_dir(project: Path) -> Path:
    return project / "models" / VARIANT


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
