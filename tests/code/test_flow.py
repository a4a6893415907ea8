"""The retraining flow end to end on a tiny project under a real Prefect engine,
real DVC and a real MLflow SQLite store."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prefect import get_client
from prefect.flow_engine import run_flow

from pipelines import schedule
from rcnnops import dvc_launcher
from rcnnops import project as dvcproj

VARIANTS = ["rcnn", "fast_rcnn", "faster_rcnn", "mask_rcnn"]


# Loads each variant's champion by alias, as a user would, with only the package.
PYFUNC_SCRIPT = """
import base64, json, sys
import mlflow, numpy as np, pandas as pd
from PIL import Image
path, variants, out = sys.argv[1], sys.argv[2:], {}
b64 = base64.b64encode(open(path, "rb").read()).decode()
pixels = np.asarray(Image.open(path).convert("RGB"))
bad = base64.b64encode(b"not an image").decode()
for v in variants:
    m = mlflow.pyfunc.load_model(f"models:/rcnnops-{v}@champion")
    low = {"score_threshold": 0.0}
    r = {"b64": m.predict(pd.DataFrame({"image": [b64]}), params=low),
         "array": m.predict(pd.DataFrame({"array": [pixels]}), params=low),
         "high": m.predict(pd.DataFrame({"image": [b64]}), params={"score_threshold": 0.99}),
         "inputs": [c.name for c in m.metadata.get_input_schema().inputs],
         "params": [p.name for p in m.metadata.get_params_schema().params],
         "example": m.metadata.saved_input_example_info is not None}
    try:
        m.predict(pd.DataFrame({"image": [bad]}))
        r["error"] = None
    except Exception as e:
        r["error"] = f"{type(e).__name__}: {e}"
    out[v] = r
print(json.dumps(out))
"""


def _mlflow(proj, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from rcnnops import registry, tracking

    tracking.setup("rcnnops-test", proj)
    return registry.get_alias("rcnnops-faster_rcnn", registry.CHAMPION)


# Enough images and epochs for every variant to learn, still seconds each: large
# unrotated shapes, and the box head the default params use (mlp_bn). Measured
# bbox AP50 on the 16 validation images (CPU, 8 epochs): rcnn 0.52, fast_rcnn 0.35,
# faster_rcnn 0.40, mask_rcnn 0.40; with other data and training seeds (3, 1):
# 0.43, 0.57, 0.34, 0.36. Untrained, or after one epoch, Faster and Mask R-CNN
# score below 0.02.
LEARNS = {
    "generate.num_train": 48,
    "generate.num_val": 16,
    "generate.min_object_size": 20,
    "generate.max_object_size": 32,
    "generate.max_rotation": 0,
    "train.*.epochs": 8,
    "train.faster_rcnn.lr": 0.02,
    "train.mask_rcnn.lr": 0.02,
    "train.faster_rcnn.model.box_head": "mlp_bn",
    "train.mask_rcnn.model.box_head": "mlp_bn",
    "train.faster_rcnn.model.stride": 4,
    "train.mask_rcnn.model.stride": 4,
}
LEARNED_AP50 = 0.25  # every variant; well above chance (~0), with margin below the lowest seen


def test_flow_end_to_end_then_noop_then_param_change(
    harness, tiny_project, monkeypatch, nameless_env
):
    from pipelines.decisions import decision_word
    from pipelines.retrain import retrain
    from rcnnops.params_edit import set_params

    monkeypatch.chdir(tiny_project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    set_params(tiny_project / "params.yaml", LEARNS)
    forks, spawn = [], dvc_launcher.spawn

    def recording(*args):
        forks.append(forked := spawn(*args))
        return forked

    monkeypatch.setattr(dvc_launcher, "spawn", recording)
    decisions = retrain(project=str(tiny_project))
    assert [d["name"] for d in decisions] == [f"rcnnops-{v}" for v in VARIANTS]
    if dvc_launcher.supported():  # data, proposals, a variant each, push: forked
        assert [type(f) for f in forks] == [dvc_launcher.Forked] * (2 + len(VARIANTS) + 1)
    assert all(d["version"] == "1" and d["promoted"] for d in decisions)
    recall = json.loads((tiny_project / "reports/proposals/metrics.json").read_text())
    assert 0.0 < recall["val"]["recall@0.5/2000"] <= 1.0
    for v in VARIANTS:  # the models learned
        ap50 = json.loads((tiny_project / f"reports/{v}/metrics.json").read_text())["bbox_AP50"]
        assert ap50 >= LEARNED_AP50, (v, ap50)
    metrics = json.loads((tiny_project / "reports/faster_rcnn/metrics.json").read_text())
    assert 0.0 <= metrics["bbox_AP"] <= 1.0 and metrics["infer_ms_per_image"] > 0
    assert (tiny_project / "reports/faster_rcnn/pr_curve.png").is_file()
    mask = json.loads((tiny_project / "reports/mask_rcnn/metrics.json").read_text())
    assert 0.0 <= mask["segm_AP"] <= 1.0 and "per_class_segm_AP" in mask
    assert decisions[VARIANTS.index("mask_rcnn")]["metric"] == "segm_AP"  # its gate metric
    assert (tiny_project / "models/mask_rcnn/loss.csv").read_text().startswith("step,")
    assert (tiny_project / "models/faster_rcnn/checkpoints/epoch_0008.pt").is_file()
    assert (tiny_project / ".dvcremote").is_dir() and any((tiny_project / ".dvcremote").rglob("*"))
    champion = _mlflow(tiny_project, monkeypatch)
    assert champion is not None and str(champion.version) == "1"
    for tag in ("git_commit", "data_hash", "params_hash", "variant", "model_hash"):
        assert champion.tags.get(tag), tag

    # Every champion loads as a pyfunc in a fresh process and detects on an image.
    img = next((tiny_project / "data/raw/shapes/val").glob("*.png"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tiny_project / 'mlflow.db'}"}
    proc = subprocess.run(
        [sys.executable, "-c", PYFUNC_SCRIPT, str(img), *VARIANTS],
        env=env,
        cwd=tiny_project,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for v in VARIANTS:
        (det,) = out[v]["b64"]
        keys = {"boxes", "labels", "names", "scores"} | ({"masks"} if v == "mask_rcnn" else set())
        assert set(det) == keys, v
        assert all(n in ("circle", "square") for n in det["names"])
        assert out[v]["array"] == out[v]["b64"]  # base64 file or uint8 pixels: same answer
        assert all(s >= 0.99 for s in out[v]["high"][0]["scores"])
        assert "not an image file" in out[v]["error"]
        assert out[v]["inputs"] == ["image", "array"] and out[v]["params"] == ["score_threshold"]
        assert out[v]["example"]  # an input example is logged with the model
    masks = out["mask_rcnn"]["b64"][0]["masks"]
    assert len(masks) == len(out["mask_rcnn"]["b64"][0]["boxes"])
    assert all(isinstance(m["counts"], str) and m["size"] == [64, 64] for m in masks)
    assert (tiny_project / "reports/compare/side_by_side.png").is_file()

    # Nothing changed: a run of the weekly deployment (created from it, as the
    # scheduler does) skips everything in DVC; registration is idempotent.
    lock = (tiny_project / "dvc.lock").read_text()
    model_mtime = (tiny_project / "models/faster_rcnn/model.pt").stat().st_mtime_ns
    deployment = schedule.deployment(tiny_project, "0 3 * * 1", name="weekly")
    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run_from_deployment(deployment.apply())
    decisions = run_flow(retrain, flow_run=flow_run, parameters=flow_run.parameters)
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(flow_run.id).state.is_completed()
    for d in decisions:
        assert d["version"] == "1" and not d["promoted"] and "model unchanged" in d["reason"]
        assert decision_word(d) == "unchanged"  # not "kept": it was not decided against v1
    champion = _mlflow(tiny_project, monkeypatch)
    assert champion.tags["promotion.decision"] == "promoted"  # the audit trail is intact
    assert (tiny_project / "dvc.lock").read_text() == lock
    assert (tiny_project / "models/faster_rcnn/model.pt").stat().st_mtime_ns == model_mtime

    # `rcnnops run` finds that nothing changed without starting the flow, and
    # does start it when an output is gone or the registry lost a version.
    from pipelines import state
    from rcnnops import tracking

    up = state.check(tiny_project, VARIANTS, ".dvcremote", push=True)
    assert up and "up to date" in up and "rcnnops-mask_rcnn v1" in up
    assert state.check(tiny_project, VARIANTS, ".dvcremote", push=False) is None
    assert state.check(tiny_project, ["faster_rcnn"], ".dvcremote", push=True) is None
    report = tiny_project / "reports/rcnn/metrics.json"
    saved = report.read_bytes()
    report.unlink()
    assert state.check(tiny_project, VARIANTS, ".dvcremote", push=True) is None
    report.write_bytes(saved)
    reg = tracking.client()
    reg.delete_model_version_tag("rcnnops-rcnn", "1", "promotion.decision")
    assert state.check(tiny_project, VARIANTS, ".dvcremote", push=True) is None
    reg.set_model_version_tag("rcnnops-rcnn", "1", "promotion.decision", "promoted")
    assert state.check(tiny_project, VARIANTS, ".dvcremote", push=True) == up
    # The same from the command, as a uid the system cannot name (docker run -u):
    # DVC's status needs a user name, which the command gives it.
    nameless_env.pop("MLFLOW_TRACKING_URI", None)
    cli = subprocess.run(
        [str(Path(sys.executable).parent / "rcnnops"), "run"],
        cwd=tiny_project,
        env=nameless_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0 and cli.stdout.startswith("up to date"), cli.stdout + cli.stderr

    # One training param changed: only that variant's training is stale (its
    # evaluation follows once the model changes); data stages are untouched.
    params = yaml.safe_load((tiny_project / "params.yaml").read_text())
    params["train"]["faster_rcnn"]["lr"] = 0.03
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(params))
    assert set(dvcproj.status(tiny_project)) == {"train@faster_rcnn"}
    params["train"]["faster_rcnn"]["lr"] = 0.02
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(params))
    assert dvcproj.status(tiny_project) == {}

    # svd_rank is a loading setting: evaluation reruns, training does not.
    params["evaluate"]["svd_rank"] = 8
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(params))
    assert set(dvcproj.status(tiny_project)) == {f"evaluate@{v}" for v in VARIANTS}
    del params["evaluate"]["svd_rank"]
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


def test_slots_a_killed_run_left_held_are_reclaimed(harness, tmp_path, monkeypatch):
    """On the ephemeral API nothing expires a dead run's slot lease: the next flow
    process gives it back, but only when no other rcnnops flow process is alive
    (their slots are real)."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    from pipelines import slots

    monkeypatch.setattr(slots, "_flows_fd", None)
    lock = tmp_path / slots.FLOWS_LOCK
    other_flow = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_SH); print('running', flush=True); time.sleep(60)\n"
    )
    with get_client(sync_client=True) as client:

        def held() -> int:
            return client.read_global_concurrency_limit_by_name(slots.STAGES_LIMIT).active_slots

        client.upsert_global_concurrency_limit_by_name(slots.STAGES_LIMIT, 1)
        dead_run = GlobalConcurrencyLimitUpdate(active_slots=1)
        client.update_global_concurrency_limit(slots.STAGES_LIMIT, dead_run)
        proc = subprocess.Popen(
            [sys.executable, "-c", other_flow, str(lock)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout.readline().strip() == "running"
            assert slots.reclaim_leaked_slots(client, lock) == 0 and held() == 1
        finally:
            proc.kill()
            proc.wait()
        assert slots.reclaim_leaked_slots(client, lock) == 1 and held() == 0
        os.close(slots._flows_fd)


def test_a_stage_says_when_other_runs_hold_every_slot(harness):
    """A stage that must wait for another run's stage says so, naming the limit
    and how full it is; with a slot free it says nothing."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    from pipelines import slots

    plan = slots.plan(1, "cpu", gpu_ids=())
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(slots.STAGES_LIMIT, 1)
        client.update_global_concurrency_limit(
            slots.STAGES_LIMIT, GlobalConcurrencyLimitUpdate(active_slots=0)
        )
        assert slots._taken(plan) == ""
        client.update_global_concurrency_limit(
            slots.STAGES_LIMIT, GlobalConcurrencyLimitUpdate(active_slots=1)
        )
        try:
            assert slots._taken(plan) == "rcnnops-stages 1 of 1"
        finally:
            client.update_global_concurrency_limit(
                slots.STAGES_LIMIT, GlobalConcurrencyLimitUpdate(active_slots=0)
            )


def test_a_failing_warm_up_is_logged_and_fails_nothing(harness, monkeypatch, caplog):
    """The warm-up only loads ahead what registration loads anyway: if that fails
    (say an MLflow module does not import), the task says so and completes; the
    task that needs the module reports the real error then."""
    import logging

    from prefect import flow

    from pipelines import retrain
    from rcnnops import registry

    def broken():
        raise RuntimeError("no usable backend")

    monkeypatch.setattr(registry, "warm_up", broken)
    monkeypatch.setattr(retrain, "get_run_logger", lambda: logging.getLogger("warm-up-test"))

    @flow
    def warm_only():
        future = retrain.warm_up.submit()
        future.wait()
        return future.state

    with caplog.at_level(logging.WARNING, logger="warm-up-test"):
        state = warm_only()
    assert state.is_completed()
    assert "warm-up: RuntimeError: no usable backend (loaded when needed instead)" in caplog.text
