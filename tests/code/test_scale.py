"""Scaling out (issue 8): parallel variants under Prefect concurrency limits, a
real `mlflow server` as the shared tracking store, and a DVC remote shared by two
clones. The flow tests are opt-in (``-m scale``; `.ci/run` runs them)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from prefect import get_client

from pipelines import slots
from rcnnops import project as dvcproj
from rcnnops.serving.process import free_port
from tests.conftest import TINY_PARAMS


def test_parallel_must_be_positive_or_auto(tmp_path):
    from rcnnops.config import ParamsError, parse_params

    raw = yaml.safe_load(TINY_PARAMS)
    assert parse_params(raw).pipeline.parallel == "auto"
    assert parse_params({**raw, "pipeline": {"parallel": 2}}).pipeline.parallel == 2
    with pytest.raises(ParamsError, match=r"pipeline\.parallel: must be > 0"):
        parse_params({**raw, "pipeline": {"parallel": 0}})
    with pytest.raises(ParamsError, match=r"pipeline\.parallel"):
        parse_params({**raw, "pipeline": {"parallel": "many"}})


def test_remote_from_params_is_the_checkouts_default(tmp_path):
    proj = tmp_path / "p"
    proj.mkdir()
    dvcproj.ensure_dvc(proj)
    assert dvcproj.dvc_config(proj)["core.remote"] == dvcproj.DEFAULT_REMOTE_NAME
    shared = tmp_path / "shared-remote"
    done = dvcproj.ensure_dvc(proj, str(shared))
    config = dvcproj.dvc_config(proj)
    assert config["core.remote"] == dvcproj.TEAM_REMOTE and shared.is_dir()
    assert config[f"remote.{dvcproj.TEAM_REMOTE}.url"] == str(shared.resolve()) and done
    assert dvcproj.ensure_dvc(proj, str(shared)) == []  # already so: nothing to do
    assert "rcnnops" not in (proj / ".dvc/config").read_text()  # this checkout only
    assert dvcproj.ensure_dvc(proj, "s3://team-bucket/rcnnops")
    assert dvcproj.dvc_config(proj)["remote.rcnnops.url"] == "s3://team-bucket/rcnnops"


# --- flows (opt-in) ----------------------------------------------------------------


def _params(project: Path, **changes) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for key, value in changes.items():
        node = params
        *parents, leaf = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _stale(project: Path, variants: list[str]) -> list[str]:
    """The variants' train / evaluate stages DVC would rerun (others never ran here)."""
    stages = [f"{s}@{v}" for v in variants for s in ("train", "evaluate")]
    return [s for s in stages if dvcproj.is_stale(project, s)]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.scale
def test_variants_train_concurrently_under_the_limit(harness, tiny_project, monkeypatch):
    from pipelines.retrain import retrain
    from rcnnops import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _params(tiny_project, variants=["faster_rcnn", "mask_rcnn"], **{"pipeline.parallel": 2})
    decisions = retrain(project=str(tiny_project), push_to_remote=False)
    assert [d["version"] for d in decisions] == ["1", "1"]
    assert _stale(tiny_project, ["faster_rcnn", "mask_rcnn"]) == []  # both in dvc.lock
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(slots.STAGES_LIMIT).limit == 2
    tracking.setup("rcnnops-test", tiny_project)
    runs = tracking.client().search_runs(
        [tracking.client().get_experiment_by_name("rcnnops-test").experiment_id],
        filter_string="tags.variant != ''",
    )
    spans = {r.data.tags["variant"]: (r.info.start_time, r.info.end_time) for r in runs}
    (a0, a1), (b0, b1) = spans["faster_rcnn"], spans["mask_rcnn"]
    assert max(a0, b0) < min(a1, b1), f"trainings did not overlap: {spans}"


def _start_mlflow_server(tmp: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` on loopback: SQLite backend, separate artifact root."""
    port = port or free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = open(tmp / "mlflow-server.log", "ab")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp / 'server.db'}",
            "--artifacts-destination",
            str(tmp / "artifact-root"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],  # fmt: skip
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp / "mlflow-server.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    pytest.fail("mlflow server did not come up:\n" + (tmp / "mlflow-server.log").read_text())


def _stop(proc: subprocess.Popen) -> None:
    from rcnnops.serving.process import stop_server

    stop_server(proc)


@pytest.mark.scale
def test_flow_against_a_real_mlflow_server(harness, tiny_project, tmp_path, monkeypatch):
    """Runs, models and aliases land on the server; artifacts in its artifact root."""
    from pipelines.retrain import retrain

    server_dir = tmp_path / "server"
    server_dir.mkdir()
    proc, url = _start_mlflow_server(server_dir)
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        _params(tiny_project, variants=["faster_rcnn"])
        (d,) = retrain(project=str(tiny_project), push_to_remote=False)
        assert d["promoted"] and d["version"] == "1"
        from mlflow import MlflowClient

        client = MlflowClient(url, registry_uri=url)  # not the registry a test set globally
        mv = client.get_model_version_by_alias("rcnnops-faster_rcnn", "champion")
        assert mv.version == "1" and mv.tags["variant"] == "faster_rcnn"
        run = client.get_run(mv.run_id)
        assert run.data.metrics["bbox_AP"] >= 0.0 and "train/loss_total" in run.data.metrics
        assert not (tiny_project / "mlflow.db").exists()  # nothing went to a local store
        stored = [p.name for p in (server_dir / "artifact-root").rglob("*") if p.is_file()]
        assert "model.pt" in stored and "MLmodel" in stored
    finally:
        _stop(proc)


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


@pytest.mark.scale
def test_second_clone_pulls_what_the_first_pushed(harness, tiny_project, tmp_path, monkeypatch):
    from pipelines.retrain import retrain

    remote = tmp_path / "team-remote"
    monkeypatch.setenv("RCNNOPS_DVC_REMOTE", str(remote))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _params(tiny_project, variants=["faster_rcnn"])
    (tiny_project / ".gitignore").write_text("/data/\n/models/\n/reports/\n/mlflow.db\n")
    _git(tiny_project, "init", "-q", "-b", "main")
    retrain(project=str(tiny_project))
    assert any(remote.rglob("*")), "the flow pushed nothing"
    _git(tiny_project, "add", "-A")
    _git(tiny_project, "commit", "-qm", "pipeline run")

    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", str(tiny_project), str(clone))
    assert not (clone / "models").exists()
    (d,) = retrain(project=str(clone))
    model = "models/faster_rcnn/model.pt"
    assert _sha(clone / model) == _sha(tiny_project / model)  # pulled, not retrained
    assert (clone / "dvc.lock").read_text() == (tiny_project / "dvc.lock").read_text()
    assert (clone / "reports/faster_rcnn/metrics.json").is_file()
    assert d["version"] == "1"  # registered in the clone's own store from the pulled model,
    # in a run made for it there that names the training run in the first clone's store
    trained_in = json.loads((tiny_project / "models/faster_rcnn/model.json").read_text())["run_id"]
    own = MlflowClient(tracking_uri=f"sqlite:///{clone / 'mlflow.db'}")
    mv = own.get_model_version("rcnnops-faster_rcnn", "1")
    assert mv.tags["trained_in_run"] == trained_in != mv.run_id
    shutil.rmtree(clone / "models")  # and `dvc pull` by hand brings it back too
    dvcproj.pull(clone)
    assert _sha(clone / model) == _sha(tiny_project / model)


def test_project_in_a_folder_git_ignores_gets_its_own_dvc_repo(tmp_path):
    """DVC refuses `init --subdir` in an ignored folder (e.g. a scratch folder of
    a checkout); such a project is set up as outside any git repository."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("/scratch/\n")
    ignored, tracked = tmp_path / "scratch" / "proj", tmp_path / "proj"
    for proj in (ignored, tracked):
        proj.mkdir(parents=True)
    assert dvcproj.ensure_dvc(ignored)[0] == "initialised DVC (--no-scm)"
    assert dvcproj.ensure_dvc(tracked)[0] == "initialised DVC (--subdir)"
    assert (ignored / ".dvc").is_dir() and (tracked / ".dvc").is_dir()
