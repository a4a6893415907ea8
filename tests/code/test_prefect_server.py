"""The deployment as a team runs it (issue 19): `prefect server start` on loopback,
the `gpu` process work pool, `prefect deploy --all` from the real prefect.yaml, a
worker in a checkout of the project, `prefect deployment run` with a tiny params
override. The run completes, the champion is in the shared MLflow, the run's two
markdown artifacts are readable from the API; a second run started while the
first holds the project lock is refused with the lock's message."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rcnnops.serving.process import free_port, stop_server
from tests.code.team_services import spawn, wait_http
from tests.conftest import REPO, TINY_PARAMS

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _checkout(root: Path) -> Path:
    """What a worker machine has: the project's code, prefect.yaml and params."""
    root.mkdir()
    for name in ("prefect.yaml", "dvc.yaml"):
        shutil.copy(REPO / name, root / name)
    for folder in ("src", "pipelines"):
        shutil.copytree(REPO / folder, root / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))  # fmt: skip
    (root / "params.yaml").write_text(TINY_PARAMS)
    return root


def _prefect(env: dict, *args: str, cwd: Path | None = None, timeout: float = 180) -> str:
    out = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], env=env,
                         cwd=cwd, capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert out.returncode == 0, f"prefect {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def _deploy(env: dict, checkout: Path) -> None:
    """`prefect deploy --all`, which ends by asking for the pool's workers with null
    filters: Prefect 3.8's server on fastapi 0.151 or newer refused those (422) and
    the command exited 1 (hence fastapi<0.151 in pyproject.toml)."""
    _prefect(env, "deploy", "--all", cwd=checkout)
    assert "weekly" in _prefect(env, "deployment", "inspect", "rcnnops-retrain/weekly")


def _run_id(stdout: str) -> str:
    for line in stdout.splitlines():
        if "UUID:" in line:
            return line.split("UUID:")[1].strip()
    raise AssertionError(f"no flow run id in:\n{stdout}")


def _read(api: str, method: str, **kwargs):
    """``PrefectClient.<method>(**kwargs)`` against this server, whatever the settings."""
    from prefect.client.orchestration import PrefectClient

    async def read():
        async with PrefectClient(api) as client:
            return await getattr(client, method)(**kwargs)

    return asyncio.run(read())


def _flow_run(api: str, run_id: str):
    return _read(api, "read_flow_run", flow_run_id=run_id)


def _artifacts(api: str, run_id) -> list:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    flow_run = ArtifactFilterFlowRunId(any_=[run_id])
    return _read(api, "read_artifacts", artifact_filter=ArtifactFilter(flow_run_id=flow_run))


def _wait_state(api: str, run_id: str, want: set[str], timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = _flow_run(api, run_id)
        if run.state and run.state.type.value in want:
            return run
        time.sleep(2)
    pytest.fail(f"flow run {run_id} is {run.state and run.state.type.value} after {timeout} s")


@pytest.mark.scale
def test_deployment_runs_on_a_worker_against_a_prefect_server(tmp_path, monkeypatch):
    from tests.code.test_scale import _start_mlflow_server

    home = tmp_path / "prefect-home"
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(home), "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }  # fmt: skip
    monkeypatch.setenv("PREFECT_API_URL", api)
    mlflow_dir = tmp_path / "mlflow"
    mlflow_dir.mkdir()
    procs: list[subprocess.Popen] = []
    try:
        mlflow_proc, mlflow_url = _start_mlflow_server(mlflow_dir)
        procs.append(mlflow_proc)
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
               "--port", str(port)]  # fmt: skip
        server = spawn(cmd, env, tmp_path / "server.log")
        procs.append(server)
        wait_http(f"{api}/health", server, tmp_path / "server.log")
        _prefect(env, "work-pool", "create", "gpu", "--type", "process")
        checkout = _checkout(tmp_path / "checkout")
        _deploy(env, checkout)

        worker_env = env | {"RCNNOPS_PROJECT_DIR": str(checkout),
                            "MLFLOW_TRACKING_URI": mlflow_url}  # fmt: skip
        worker = spawn([sys.executable, "-m", "prefect", "worker", "start", "--pool", "gpu"],
                        worker_env, tmp_path / "worker.log", cwd=checkout)  # fmt: skip
        procs.append(worker)

        tiny = ["--param", 'variants=["faster_rcnn"]', "--param", "push_to_remote=false"]
        first = _run_id(_prefect(env, "deployment", "run", "rcnnops-retrain/weekly", *tiny))
        _wait_state(api, first, {"RUNNING"} | TERMINAL, 180)
        lock = checkout / ".rcnnops.lock"
        deadline = time.monotonic() + 120  # the flow takes the lock as it starts
        while not (lock.is_file() and lock.read_text()):
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.5)
        second = _run_id(_prefect(env, "deployment", "run", "rcnnops-retrain/weekly", *tiny))
        refused = _wait_state(api, second, TERMINAL, 300)
        assert refused.state.type.value == "FAILED"
        assert "another rcnnops run" in refused.state.message, refused.state.message

        done = _wait_state(api, first, TERMINAL, 900)
        assert done.state.type.value == "COMPLETED", (tmp_path / "worker.log").read_text()[-5000:]

        from mlflow import MlflowClient

        client = MlflowClient(mlflow_url, registry_uri=mlflow_url)  # not a global registry
        mv = client.get_model_version_by_alias("rcnnops-faster_rcnn", "champion")
        assert mv.version == "1"
        # what a user lists with Prefect's own CLI and client (null filters, see _deploy)
        wide = env | {"COLUMNS": "200"}  # the table's cells are cut to the terminal's width
        runs = _prefect(wide, "flow-run", "ls", "--flow-name", "rcnnops-retrain")
        assert done.name in runs and refused.name in runs, runs
        found = {a.key: a.model_dump(mode="json") for a in _artifacts(api, done.id)}
        assert set(found) == {"rcnnops-promotion", "rcnnops-compare"}
        assert all(a["type"] == "markdown" for a in found.values())
        assert "faster_rcnn" in found["rcnnops-promotion"]["data"]
        print(json.dumps({k: a["data"][:300] for k, a in found.items()}, indent=1))
        _look_in_browsers(mlflow_url, f"http://127.0.0.1:{port}", done, found, tmp_path)
    finally:
        for proc in reversed(procs):
            stop_server(proc)
    for proc in procs:
        assert proc.poll() is not None  # nothing left running


def _look_in_browsers(mlflow_url: str, prefect_url: str, run, artifacts: dict, tmp: Path):
    """What a user sees in both UIs, in headless Chromium: the registry with the
    champion, the experiment's training runs with their datasets and metrics, the
    flow run and its artifacts. Screenshots go to ``$RCNNOPS_SCREENSHOTS`` (the
    README's pictures) or the test's folder."""
    import re

    from mlflow import MlflowClient

    from tests.code import browser

    assert browser.chromium(), "headless Chromium is needed: apt install chromium"
    shots = Path(os.environ.get("RCNNOPS_SCREENSHOTS") or tmp / "screenshots")

    def text(url: str) -> str:
        page = re.sub(r"<(script|style)\b.*?</\1>", " ", browser.dom(url), flags=re.S)
        return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))

    registry = text(f"{mlflow_url}/#/models")
    assert "rcnnops-faster_rcnn" in registry and "champion" in registry, registry[:2000]
    model_page = f"{mlflow_url}/#/models/rcnnops-faster_rcnn"
    assert "trained on data" in text(model_page)  # the version's description
    client = MlflowClient(mlflow_url, registry_uri=mlflow_url)
    exp = client.get_experiment_by_name("rcnnops-test")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs_page = f"{mlflow_url}/#/experiments/{exp.experiment_id}?workflowType=machine_learning"
    runs = text(runs_page)
    assert "faster_rcnn" in runs and "Dataset" in runs, runs[:2000]
    mv = client.get_model_version_by_alias("rcnnops-faster_rcnn", "champion")
    run_page = f"{mlflow_url}/#/experiments/{exp.experiment_id}/runs/{mv.run_id}"
    assert "val/bbox_AP" in text(run_page)
    flow_page = f"{prefect_url}/runs/flow-run/{run.id}"
    assert run.name in text(flow_page)
    compare = artifacts["rcnnops-compare"]
    artifact_page = f"{prefect_url}/artifacts/artifact/{compare['id']}"
    assert "faster_rcnn" in text(artifact_page)
    browser.screenshot(model_page, shots / "mlflow-registry.png")
    browser.screenshot(artifact_page, shots / "prefect-compare.png")
    browser.screenshot(runs_page, shots / "mlflow-runs.png")
