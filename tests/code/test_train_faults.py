"""Faults in training (issue 6): a kill mid-epoch, a diverging loss, and corrupt or
truncated checkpoints and model files.

The SIGKILL test runs the real ``rcnnops train`` in a subprocess (opt-in:
``-m reliability``); the default suite has an in-process twin that stops the
stage right after MLflow recorded a mid-epoch step.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time

import pytest
import torch

from rcnnops import tracking
from rcnnops.checkpoints import Checkpoints
from rcnnops.cli import main
from rcnnops.data.dataset import DetectionDataset
from rcnnops.data.prepare import load_split
from rcnnops.data.transforms import RandomHorizontalFlip
from rcnnops.engine import fit
from rcnnops.models import build_model
from rcnnops.models.io import CheckpointError, load_model, save_model
from rcnnops.tracking import unlogged
from tests.code.test_train import CFG, MODEL  # the same tiny model and schedule
from tests.code.training_runs import (
    EXPERIMENT,
    VARIANT,
    assert_same_weights,
    client,
    histories,
    make_project,
    model_dir,
    runs,
    start_training,
    tiny_params,
    train,
    use_store,
    weights,
)

CPU = torch.device("cpu")
TRAIN = ["train", "--variant", VARIANT, "--no-progress"]
# Wall-clock and memory readings: differ between runs.
TIMING = {
    "train_seconds",
    "val/infer_ms_per_image",
    "train_epoch/images_per_s",
    "peak_rss_mb",
    "peak_gpu_memory_mb",
}


def assert_continues(ref_hist: dict, hist: dict) -> None:
    """The resumed run's metrics are the uninterrupted run's: the same keys, each
    step exactly once, and (but for timings) the same values."""
    assert hist.keys() == ref_hist.keys()
    for key, ref in ref_hist.items():
        steps = [s for s, _ in hist[key]]
        assert len(steps) == len(set(steps)), f"{key}: duplicate steps {steps}"
        assert steps == [s for s, _ in ref], f"{key}: steps {steps}"
        if key not in TIMING:
            assert hist[key] == ref, key


def test_unlogged_skips_what_the_run_already_holds():
    done = {"train/loss_total": 6, "val/bbox_AP": 1, "train_seconds": 0}
    metrics = {"train/loss_total": 1.0, "train/lr": 0.1}
    assert unlogged(metrics, 6, done) == {"train/lr": 0.1}
    assert unlogged(metrics, 7, done) == metrics
    assert unlogged({"val/bbox_AP": 0.5}, 1, done) == {}
    assert unlogged({"val/bbox_AP": 0.5}, 2, done) == {"val/bbox_AP": 0.5}
    assert unlogged({"train_seconds": 3.0}, None, done) == {}  # no step is step 0
    assert unlogged({"train_seconds": 3.0}, None, {}) == {"train_seconds": 3.0}


def test_stage_stopped_mid_epoch_resumes_its_mlflow_run(tmp_path, monkeypatch):
    """In-process twin of the SIGKILL test: the stage dies right after MLflow
    recorded step 3 (mid-epoch 2 of 2-step epochs); the rerun continues the same
    MLflow run, logs each step once, and ends with the uninterrupted weights."""
    store = tmp_path / "mlflow.db"
    use_store(store, monkeypatch)
    small = {"generate": {"num_train": 8, "num_val": 4}, "common": {"log_every": 1}}
    ref = make_project(tmp_path / "ref", tiny_params(**small, experiment="ref", epochs=2))
    assert main(["-C", str(ref), *TRAIN]) == 0
    proj = make_project(tmp_path / "run", tiny_params(**small, epochs=2), data_from=ref)

    real = tracking.log_metrics

    def dies_after_step_3(metrics, step=None):
        real(metrics, step)
        if step == 3 and "train/loss_total" in metrics:
            raise KeyboardInterrupt

    monkeypatch.setattr(tracking, "log_metrics", dies_after_step_3)
    model_dir(proj).mkdir(parents=True)
    for earlier in ("loss.csv", "loss.png"):  # an earlier training's curve
        (model_dir(proj) / earlier).write_text("from another training")
    assert main(["-C", str(proj), *TRAIN]) == 130
    folder = model_dir(proj) / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_0001.pt"]
    for gone in ("model.pt", "loss.csv", "loss.png"):  # nothing beside no model
        assert not (model_dir(proj) / gone).exists(), gone
    (killed,) = runs(store)
    logged = [s for s, _ in histories(store, killed.info.run_id)["train/loss_total"]]
    assert logged == [1, 2, 3]  # step 3 came after the checkpoint

    before = torch.load(folder / "epoch_0001.pt", weights_only=True)["seconds"]
    assert before > 0  # the interrupted process's training time, kept by its checkpoint
    monkeypatch.setattr(tracking, "log_metrics", real)
    t0 = time.perf_counter()
    assert main(["-C", str(proj), *TRAIN]) == 0
    rerun = time.perf_counter() - t0
    (run,) = runs(store)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    # the training time counts the part before the interruption too (it was only the rerun's)
    meta = json.loads((model_dir(proj) / "model.json").read_text())
    assert before < meta["train_seconds"] <= before + rerun + 0.01
    assert run.data.metrics["train_seconds"] == pytest.approx(meta["train_seconds"], abs=0.01)
    (ref_run,) = runs(store, "ref")
    assert_continues(histories(store, ref_run.info.run_id), histories(store, run.info.run_id))
    assert_same_weights(weights(model_dir(ref) / "model.pt"), weights(model_dir(proj) / "model.pt"))


def _kill_mid_epoch(proj, proc, log, steps_per_epoch: int) -> tuple[str, int]:
    """SIGKILL the training once MLflow holds 3+ steps past its newest checkpoint
    (and before the next one); returns the run id and the last logged step."""
    folder = model_dir(proj) / "checkpoints"
    run_id, deadline = None, time.monotonic() + 600
    while time.monotonic() < deadline:
        assert proc.poll() is None, "training ended before the kill:\n" + log.read_text()
        done = sorted(folder.glob("epoch_*.pt"))
        if done:
            if run_id is None:
                run_id = torch.load(done[0], weights_only=True)["extra"]["run_id"]
            boundary = int(done[-1].stem.split("_")[1]) * steps_per_epoch
            steps = [m.step for m in client(proj).get_metric_history(run_id, "train/loss_total")]
            if boundary + 3 <= max(steps) < boundary + steps_per_epoch:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return run_id, max(steps)
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("the training never got 3 steps past a checkpoint:\n" + log.read_text())


@pytest.mark.reliability
def test_sigkill_mid_epoch_then_rerun_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    """`rcnnops train` SIGKILLed mid-epoch 2 (8-step epochs) and rerun: it resumes
    from the epoch-1 checkpoint, continues the same MLflow run with no duplicate
    and no missing step, and its final weights equal an uninterrupted run's bit
    for bit (CPU, fixed seed: data order and RNG state are restored)."""
    params = tiny_params(epochs=2, batch_size=2, common={"log_every": 1})
    ref = make_project(tmp_path / "ref", params)
    train(ref)
    proj = make_project(tmp_path / "run", params, data_from=ref)
    log = tmp_path / "killed.log"
    proc = start_training(proj, log)
    run_id, last = _kill_mid_epoch(proj, proc, log, steps_per_epoch=8)
    folder = model_dir(proj) / "checkpoints"
    newest = sorted(folder.glob("epoch_*.pt"))[-1]
    assert last > int(newest.stem.split("_")[1]) * 8  # steps beyond the checkpoint were logged
    assert not list(folder.glob("*.tmp")) and not (model_dir(proj) / "model.pt").exists()
    print(f"killed at step {last}; newest checkpoint {newest.name}")

    out = train(proj)
    assert f"resuming from {newest.relative_to(proj)}" in out
    (run,) = runs(proj)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    (ref_run,) = runs(ref)
    assert_continues(histories(ref, ref_run.info.run_id), histories(proj, run_id))
    assert_same_weights(weights(model_dir(ref) / "model.pt"), weights(model_dir(proj) / "model.pt"))


def test_divergence_stops_keeps_the_last_good_checkpoint_and_writes_no_model(
    tmp_path, monkeypatch, capsys
):
    """Epoch 1 trains normally; epoch 2's lr (x 1e30 at the lr step) blows the loss
    up. The stage exits 2 with a message, the epoch-1 checkpoint stays loadable,
    no model.pt/model.json exists (a stale one from before is gone), so nothing
    can be registered or promoted, and the MLflow run is marked failed."""
    small = {"num_train": 8, "num_val": 4}
    params = tiny_params(generate=small, epochs=3, lr_steps=[1], gamma=1e30, clip_grad_norm=None)
    proj = make_project(tmp_path / "p", params)
    use_store(proj / "mlflow.db", monkeypatch)
    out = model_dir(proj)
    out.mkdir(parents=True)
    (out / "model.pt").write_bytes(b"an earlier training's weights")
    (out / "model.json").write_text("{}")
    capsys.readouterr()

    assert main(["-C", str(proj), *TRAIN]) == 2
    err = capsys.readouterr().err
    assert "error: non-finite loss at epoch 2" in err and "epoch_0001.pt" in err
    assert "Traceback" not in err
    assert not (out / "model.pt").exists() and not (out / "model.json").exists()
    ckpts = Checkpoints(out / "checkpoints")
    assert [p.name for p in ckpts.folder.iterdir()] == ["epoch_0001.pt"]
    state = ckpts.load(ckpts.latest())
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    (run,) = runs(proj)
    assert run.info.status == "FAILED"

    from rcnnops import registry

    with pytest.raises(FileNotFoundError, match="no trained model"):
        registry.register(VARIANT, out, proj / "reports" / VARIANT, EXPERIMENT)
    assert client(proj).search_registered_models() == []


# --- corrupt files ----------------------------------------------------------------


def _data(prepared):
    coco, root, labels = load_split(prepared, "train")
    return DetectionDataset(coco, root, labels, RandomHorizontalFlip(0.5)), labels


def _model(labels):
    torch.manual_seed(0)
    return build_model(VARIANT, labels.num_classes + 1, MODEL)


GARBAGE = random.Random(0).randbytes(4096)  # fixed: what torch says depends on the bytes


class _Payload:
    """Unpickling this runs code (what weights-only loading refuses)."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _damage(kind: str, path, tmp_path) -> None:
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(GARBAGE)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "payload":
        torch.save({"model": _Payload(tmp_path / "ran"), "epoch": 2, "fingerprint": "fp"}, path)
    elif kind == "foreign":  # a valid torch file, not a checkpoint
        torch.save({"weights": torch.ones(3)}, path)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "payload", "foreign"])
def test_unreadable_newest_checkpoint_is_set_aside(tmp_path, capsys, kind):
    """Disk faults, not kills (writes are atomic): the newest checkpoint is renamed
    *.corrupt with a warning naming it, and the one before is used."""
    ckpts = Checkpoints(tmp_path / "c")
    for epoch in (1, 2):
        ckpts.save({"model": {}, "epoch": epoch, "fingerprint": "fp"}, epoch)
    _damage(kind, ckpts.folder / "epoch_0002.pt", tmp_path)
    path, state = ckpts.latest_good()
    assert path.name == "epoch_0001.pt" and state["epoch"] == 1
    err = capsys.readouterr().err
    assert f"{ckpts.folder / 'epoch_0002.pt'}: cannot load checkpoint (" in err
    assert "moved to epoch_0002.pt.corrupt; resuming from epoch_0001.pt instead" in err
    assert sorted(p.name for p in ckpts.folder.iterdir()) == [
        "epoch_0001.pt",
        "epoch_0002.pt.corrupt",
    ]
    assert ckpts.latest_good()[0] == path and capsys.readouterr().err == ""
    assert not (tmp_path / "ran").exists()  # a payload never runs


def test_training_resumes_from_the_checkpoint_before_a_truncated_one(tiny_prepared, tmp_path):
    """...and the result is the uninterrupted run's, bit for bit (the lost epoch
    is trained again)."""
    ds, labels = _data(tiny_prepared)
    ref = _model(labels)
    ref_ckpts = Checkpoints(tmp_path / "ref")
    fit(ref, ds, CFG, ref_ckpts, "fp", CPU, progress=False)
    assert [p.name for p in sorted(ref_ckpts.folder.iterdir())] == [
        "epoch_0001.pt",
        "epoch_0002.pt",
    ]
    ckpts = Checkpoints(tmp_path / "c")
    shutil.copytree(ref_ckpts.folder, ckpts.folder)
    _damage("truncated", ckpts.folder / "epoch_0002.pt", tmp_path)
    model = _model(labels)
    fit(model, ds, CFG, ckpts, "fp", CPU, progress=False)
    assert_same_weights(ref.state_dict(), model.state_dict())
    assert sorted(p.name for p in ckpts.folder.iterdir()) == [
        "epoch_0001.pt",
        "epoch_0002.pt",  # written again
        "epoch_0002.pt.corrupt",
    ]


def test_no_loadable_checkpoint_is_an_error_naming_the_file_and_the_fix(tmp_path):
    folder = tmp_path / "models" / VARIANT / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"model": {}, "epoch": 1, "fingerprint": "fp"}, folder / "epoch_0001.pt")
    good = (folder / "epoch_0001.pt").read_bytes()
    (folder / "epoch_0001.pt").write_bytes(good[:100])
    (folder / "epoch_0002.pt").write_bytes(GARBAGE)
    ckpts = Checkpoints(folder, rerun=f"dvc repro train@{VARIANT}")
    with pytest.raises(CheckpointError) as err:
        ckpts.latest_good()
    msg = str(err.value)
    assert msg.startswith(f"{folder / 'epoch_0002.pt'}: cannot load checkpoint (not plain tensors")
    assert "no earlier checkpoint loads either (epoch_0001.pt)" in msg
    assert msg.endswith(f"delete {folder} to train from scratch (then `dvc repro train@{VARIANT}`)")
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_0001.pt", "epoch_0002.pt"]

    (folder / "epoch_0002.pt").unlink()  # only one, truncated: the same error, for that file
    with pytest.raises(CheckpointError, match=r"epoch_0001.pt: cannot load checkpoint \("):
        ckpts.latest_good()


def test_corrupt_model_files_name_the_file_and_how_to_get_them_back(tmp_path):
    folder = tmp_path / "models" / VARIANT
    save_model(
        build_model(VARIANT, 3, MODEL),
        folder,
        {
            "variant": VARIANT,
            "num_classes": 3,
            "model_params": MODEL,
        },
    )
    load_model(folder)  # the intact files load
    pt = folder / "model.pt"
    pt.write_bytes(pt.read_bytes()[:5000])
    with pytest.raises(CheckpointError) as err:
        load_model(folder)
    msg = str(err.value)
    assert msg.startswith(f"{pt}: cannot load model weights (")  # the cause in one line
    assert f"`dvc checkout {pt}`" in msg and f"`dvc repro -f train@{VARIANT}`" in msg
    assert "weights_only" not in msg and "Traceback" not in msg

    (folder / "model.json").write_text('{"variant": "faster_r')
    with pytest.raises(CheckpointError, match=r"model.json is corrupt \(.*\): restore it") as err:
        load_model(folder)
    assert f"train@{VARIANT}" in str(err.value)
