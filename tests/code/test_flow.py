"""The retraining flow end to end on a tiny project under a real Prefect engine,
real DVC and a real MLflow SQLite store."""

import json
import re

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from rcnnops import project as dvcproj


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _mlflow(proj, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from rcnnops import registry, tracking

    tracking.setup("rcnnops-test", proj)
    return registry.get_alias("rcnnops-faster_rcnn", registry.CHAMPION)


def test_flow_end_to_end_then_noop_then_param_change(harness, tiny_project, monkeypatch):
    from pipelines.retrain import retrain

    monkeypatch.chdir(tiny_project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (d,) = retrain(project=str(tiny_project))
    assert d["name"] == "rcnnops-faster_rcnn" and d["version"] == "1" and d["promoted"]
    metrics = json.loads((tiny_project / "reports/faster_rcnn/metrics.json").read_text())
    assert 0.0 <= metrics["bbox_AP"] <= 1.0 and metrics["infer_ms_per_image"] > 0
    assert (tiny_project / "reports/faster_rcnn/pr_curve.png").is_file()
    assert (tiny_project / "models/faster_rcnn/checkpoints/epoch_0001.pt").is_file()
    assert (tiny_project / ".dvcremote").is_dir() and any((tiny_project / ".dvcremote").rglob("*"))
    champion = _mlflow(tiny_project, monkeypatch)
    assert champion is not None and str(champion.version) == "1"
    for tag in ("git_commit", "data_hash", "params_hash", "variant", "model_hash"):
        assert champion.tags.get(tag), tag

    # Nothing changed: DVC skips everything, registration is idempotent.
    lock = (tiny_project / "dvc.lock").read_text()
    model_mtime = (tiny_project / "models/faster_rcnn/model.pt").stat().st_mtime_ns
    (d,) = retrain(project=str(tiny_project))
    assert d["version"] == "1" and not d["promoted"] and "already champion" in d["reason"]
    assert (tiny_project / "dvc.lock").read_text() == lock
    assert (tiny_project / "models/faster_rcnn/model.pt").stat().st_mtime_ns == model_mtime

    # One training param changed: only that variant's training is stale (its
    # evaluation follows once the model changes); data stages are untouched.
    params = yaml.safe_load((tiny_project / "params.yaml").read_text())
    params["train"]["faster_rcnn"]["lr"] = 0.02
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(params))
    stale = set(dvcproj.status(tiny_project))
    assert stale == {"train@faster_rcnn"}


def test_bad_data_fails_the_flow_before_training(harness, tiny_project, monkeypatch):
    from pipelines.retrain import retrain

    monkeypatch.chdir(tiny_project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    dvcproj.ensure_dvc(tiny_project)
    dvcproj.repro(tiny_project, "generate")
    ann = tiny_project / "data/raw/shapes/annotations/instances_train.json"
    coco = json.loads(ann.read_text())
    coco["annotations"][0]["category_id"] = 999
    ann.write_text(json.dumps(coco))
    with pytest.raises(dvcproj.StageError, match=re.escape("unknown category_id 999")):
        retrain(project=str(tiny_project))
    assert not (tiny_project / "data/prepared").exists()
    assert not (tiny_project / "models").exists()
