"""Faults at the flow level (issue 6, items 3 and 4), on the real engines: a
variant that fails leaves the registry as it was, and a tracking server that goes
away mid-run fails the run clearly, keeps every local output, and a rerun once it
is back registers without retraining. Opt-in: ``-m reliability``."""

import threading
import time
from pathlib import Path

import pytest

from tests.code.test_scale import _params, _sha, _stale, _start_mlflow_server, _stop

pytestmark = pytest.mark.reliability


def _versions(name: str) -> list[str]:
    from rcnnops import registry

    return sorted(str(mv.version) for mv in registry.versions(name))


def test_a_failed_variant_registers_nothing(harness, tiny_project, monkeypatch):
    from pipelines.retrain import retrain
    from rcnnops import registry, tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _params(tiny_project, variants=["faster_rcnn", "mask_rcnn"])
    assert all(d["promoted"] for d in retrain(project=str(tiny_project), push_to_remote=False))
    before = _sha(tiny_project / "models/faster_rcnn/model.pt")

    # faster_rcnn retrains fine (a new, different model); mask_rcnn diverges.
    _params(
        tiny_project,
        **{
            "train.faster_rcnn.lr": 0.02,
            "train.mask_rcnn.lr": 1.0e38,
            "train.mask_rcnn.clip_grad_norm": None,
        },
    )
    with pytest.raises(Exception, match="failed for mask_rcnn; nothing was registered"):
        retrain(project=str(tiny_project), push_to_remote=False)
    assert _sha(tiny_project / "models/faster_rcnn/model.pt") != before  # it did train
    assert _stale(tiny_project, ["faster_rcnn", "mask_rcnn"]) == [
        "train@mask_rcnn",
        "evaluate@mask_rcnn",
    ]
    tracking.setup("rcnnops-test", tiny_project)
    for variant in ("faster_rcnn", "mask_rcnn"):
        name = registry.model_name(variant)
        assert _versions(name) == ["1"], variant  # no new version of either
        assert str(registry.get_alias(name, registry.CHAMPION).version) == "1"


def _stop_when(path: Path, text: str, proc) -> threading.Thread:
    """Stop the server as soon as ``path`` contains ``text`` (DVC wrote the stage)."""

    def watch():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if path.is_file() and text in path.read_text():
                _stop(proc)
                return
            time.sleep(0.05)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def test_tracking_server_going_away_mid_run(harness, tiny_project, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from pipelines.retrain import retrain

    server_dir = tmp_path / "server"
    server_dir.mkdir()
    proc, url = _start_mlflow_server(server_dir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # Prefect's retries only
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    _params(tiny_project, variants=["faster_rcnn"])
    watcher = _stop_when(tiny_project / "dvc.lock", "evaluate@faster_rcnn", proc)
    try:
        started = time.monotonic()
        with pytest.raises(Exception, match=f"tracking server {url} does not answer"):
            retrain(project=str(tiny_project), push_to_remote=False)
        waited = time.monotonic() - started
    finally:
        watcher.join(timeout=5)
        _stop(proc)
    model = tiny_project / "models/faster_rcnn/model.pt"
    assert model.is_file() and (tiny_project / "reports/faster_rcnn/metrics.json").is_file()
    assert _stale(tiny_project, ["faster_rcnn"]) == []  # every DVC output intact
    mtime = model.stat().st_mtime_ns
    assert waited > 2 + 5 + 10  # the register task retried with its backoff first

    # The server is back (same store, same port): the rerun registers, trains nothing.
    port = int(url.rsplit(":", 1)[1])
    proc, url2 = _start_mlflow_server(server_dir, port=port)
    try:
        assert url2 == url
        (d,) = retrain(project=str(tiny_project), push_to_remote=False)
        assert d["promoted"] and d["version"] == "1"
        client = MlflowClient(url, registry_uri=url)  # not a registry set globally
        mv = client.get_model_version_by_alias("rcnnops-faster_rcnn", "champion")
        assert mv.version == "1"
    finally:
        _stop(proc)
    assert model.stat().st_mtime_ns == mtime
