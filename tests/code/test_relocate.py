"""A moved or copied project uses its own MLflow artifacts after `rcnnops relocate`
(the default SQLite store records absolute artifact locations)."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest

from rcnnops import tracking
from rcnnops.cli import main
from tests.code.trained import inside


def _store(project: Path) -> str:
    """A run with an artifact, registered as version 1 of ``rcnnops-x``."""
    project.mkdir()
    with inside(project):
        tracking.setup("rcnnops")
        (project / "weights.txt").write_text("v1 weights")
        with mlflow.start_run() as run:
            mlflow.log_artifact(str(project / "weights.txt"), "model")
        client = tracking.client()
        client.create_registered_model("rcnnops-x")
        mv = client.create_model_version(
            "rcnnops-x", f"{run.info.artifact_uri}/model", run_id=run.info.run_id
        )
    return str(mv.version)


def _download(project: Path) -> str:
    with inside(project):
        tracking.setup("rcnnops")
        local = mlflow.artifacts.download_artifacts("models:/rcnnops-x/1")
    return (Path(local) / "weights.txt").read_text()


def test_a_moved_project_finds_its_artifacts_after_relocate(tmp_path, capsys):
    old, new = tmp_path / "old", tmp_path / "moved"
    assert _store(old) == "1"
    shutil.move(old, new)
    with inside(new), pytest.raises(Exception):  # noqa: B017 (MLflow's own error)
        tracking.setup("rcnnops")
        mlflow.artifacts.download_artifacts("models:/rcnnops-x/1")
    assert f"records its artifacts under {old}/mlartifacts" in capsys.readouterr().err
    with inside(new):
        assert main(["relocate"]) == 0
    out = capsys.readouterr().out
    assert f"artifact locations moved from {old} to {new}" in out
    assert "experiments.artifact_location: 2" in out  # rcnnops and MLflow's Default
    assert "model_versions.storage_location: 1" in out
    assert _download(new) == "v1 weights"
    with inside(new):
        assert main(["relocate"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_a_copy_stops_writing_into_the_original(tmp_path, capsys):
    original, copy = tmp_path / "original", tmp_path / "copy"
    _store(original)
    shutil.copytree(original, copy)
    with inside(copy):
        assert main(["relocate"]) == 0
        tracking.setup("rcnnops")
        with mlflow.start_run() as run:
            mlflow.log_text("new", "note.txt")
    assert (copy / "mlartifacts" / run.info.run_id / "artifacts/note.txt").is_file()
    assert not (original / "mlartifacts" / run.info.run_id).exists()
    assert _download(copy) == "v1 weights" and _download(original) == "v1 weights"
