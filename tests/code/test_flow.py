"""The retraining flow end to end on a tiny project under a real Prefect engine,
real DVC and a real MLflow SQLite store."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from rcnnops import project as dvcproj

VARIANTS = ["rcnn", "fast_rcnn", "faster_rcnn", "mask_rcnn"]


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
    decisions = retrain(project=str(tiny_project))
    assert [d["name"] for d in decisions] == [f"rcnnops-{v}" for v in VARIANTS]
    assert all(d["version"] == "1" and d["promoted"] for d in decisions)
    recall = json.loads((tiny_project / "reports/proposals/metrics.json").read_text())
    assert 0.0 < recall["val"]["recall@0.5/2000"] <= 1.0
    metrics = json.loads((tiny_project / "reports/faster_rcnn/metrics.json").read_text())
    assert 0.0 <= metrics["bbox_AP"] <= 1.0 and metrics["infer_ms_per_image"] > 0
    assert (tiny_project / "reports/faster_rcnn/pr_curve.png").is_file()
    mask = json.loads((tiny_project / "reports/mask_rcnn/metrics.json").read_text())
    assert 0.0 <= mask["segm_AP"] <= 1.0 and "per_class_segm_AP" in mask
    assert decisions[VARIANTS.index("mask_rcnn")]["metric"] == "segm_AP"  # its gate metric
    assert (tiny_project / "models/mask_rcnn/loss.csv").read_text().startswith("step,")
    assert (tiny_project / "models/faster_rcnn/checkpoints/epoch_0001.pt").is_file()
    assert (tiny_project / ".dvcremote").is_dir() and any((tiny_project / ".dvcremote").rglob("*"))
    champion = _mlflow(tiny_project, monkeypatch)
    assert champion is not None and str(champion.version) == "1"
    for tag in ("git_commit", "data_hash", "params_hash", "variant", "model_hash"):
        assert champion.tags.get(tag), tag

    # The champion loads as a pyfunc in a fresh process and detects on an image.
    img = next((tiny_project / "data/raw/shapes/val").glob("*.png"))
    script = (
        "import base64, json, sys, mlflow, pandas as pd\n"
        "m = mlflow.pyfunc.load_model('models:/rcnnops-faster_rcnn@champion')\n"
        "b64 = base64.b64encode(open(sys.argv[1], 'rb').read()).decode()\n"
        "out = m.predict(pd.DataFrame({'image': [b64]}), params={'score_threshold': 0.0})\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tiny_project / 'mlflow.db'}"}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(img)],
        env=env,
        cwd=tiny_project,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (det,) = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(det) == {"boxes", "labels", "names", "scores"}
    assert all(n in ("circle", "square") for n in det["names"])

    # Nothing changed: DVC skips everything, registration is idempotent.
    lock = (tiny_project / "dvc.lock").read_text()
    model_mtime = (tiny_project / "models/faster_rcnn/model.pt").stat().st_mtime_ns
    decisions = retrain(project=str(tiny_project))
    for d in decisions:
        assert d["version"] == "1" and not d["promoted"] and "model unchanged" in d["reason"]
    champion = _mlflow(tiny_project, monkeypatch)
    assert champion.tags["promotion.decision"] == "promoted"  # the audit trail is intact
    assert (tiny_project / "dvc.lock").read_text() == lock
    assert (tiny_project / "models/faster_rcnn/model.pt").stat().st_mtime_ns == model_mtime

    # One training param changed: only that variant's training is stale (its
    # evaluation follows once the model changes); data stages are untouched.
    params = yaml.safe_load((tiny_project / "params.yaml").read_text())
    params["train"]["faster_rcnn"]["lr"] = 0.02
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(params))
    assert set(dvcproj.status(tiny_project)) == {"train@faster_rcnn"}
    params["train"]["faster_rcnn"]["lr"] = 0.01
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(params))
    assert dvcproj.status(tiny_project) == {}

    # A selective-search param: proposals, then only the proposal-based variants.
    params["proposals"]["min_size"] = 10
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(params))
    assert set(dvcproj.status(tiny_project)) == {"proposals"}
    dvcproj.repro(tiny_project, "proposals")
    assert set(dvcproj.status(tiny_project)) == {
        "train@rcnn",
        "train@fast_rcnn",
        "evaluate@rcnn",
        "evaluate@fast_rcnn",
    }


def test_bad_data_fails_the_flow_before_training(harness, tiny_project, monkeypatch):
    """A user dataset with an unknown category id stops the flow at prepare,
    with the record named, and nothing downstream is written."""
    from pipelines.retrain import retrain

    monkeypatch.chdir(tiny_project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    dvcproj.ensure_dvc(tiny_project)
    dvcproj.repro(tiny_project, "generate")
    shutil.copytree(tiny_project / "data/raw/shapes", tiny_project / "mydata")
    ann = tiny_project / "mydata/annotations/instances_train.json"
    coco = json.loads(ann.read_text())
    coco["annotations"][0]["category_id"] = 999
    ann.write_text(json.dumps(coco))
    params = yaml.safe_load((tiny_project / "params.yaml").read_text())
    params["data"]["root"] = "mydata"
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(dvcproj.StageError, match=re.escape("unknown category_id 999")):
        retrain(project=str(tiny_project))
    assert not (tiny_project / "data/prepared").exists()
    assert not (tiny_project / "models").exists()
