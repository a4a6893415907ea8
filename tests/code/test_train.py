"""Training loop: schedule, resume after interruption, clear failures."""

import json
from pathlib import Path

import pytest
import torch

from rcnnops.checkpoints import Checkpoints
from rcnnops.data.dataset import DetectionDataset
from rcnnops.data.io import DataError
from rcnnops.data.prepare import load_split
from rcnnops.data.transforms import RandomHorizontalFlip
from rcnnops.engine import TrainingDiverged, fit
from rcnnops.models import build_model
from rcnnops.models.io import CheckpointError
from rcnnops.solver import FitConfig, lr_factor

MODEL = {
    "backbone": "small",
    "min_size": 64,
    "max_size": 64,
    "anchor_sizes": [16, 32],
    "roi_op": "pool",
    "representation_size": 32,
    "box_batch_size_per_image": 16,
}
CFG = FitConfig(epochs=2, batch_size=4, lr=0.01, warmup_iters=2, lr_steps=[1], seed=3, log_every=1)


def test_lr_schedule_warmup_then_steps():
    f = lr_factor(warmup_iters=10, iters_per_epoch=5, lr_steps=[2, 3], gamma=0.1)
    assert f(0) == pytest.approx(0.001)
    assert f(5) == pytest.approx(0.001 * 0.5 + 0.5)
    assert f(10) == 1.0 * 0.1  # epoch 2 >= first step
    assert f(9) == pytest.approx(0.001 * 0.1 + 0.9)
    assert f(15) == pytest.approx(0.01)


def _data(prepared):
    coco, root, labels = load_split(prepared, "train")
    return DetectionDataset(coco, root, labels, RandomHorizontalFlip(0.5)), labels


def _model(labels):
    torch.manual_seed(0)
    return build_model("faster_rcnn", labels.num_classes + 1, MODEL)


def test_flip_moves_boxes_with_pixels():
    image = torch.zeros(3, 10, 20)
    image[:, 2:4, 1:5] = 1.0
    t = {"boxes": torch.tensor([[1.0, 2.0, 5.0, 4.0]]), "labels": torch.tensor([1])}
    flipped, ft = RandomHorizontalFlip(1.0)(image, t)
    assert ft["boxes"].tolist() == [[15.0, 2.0, 19.0, 4.0]]
    assert flipped[0, 2:4, 15:19].eq(1).all() and flipped.sum() == image.sum()


def test_logged_lr_is_the_rate_each_step_trained_with(tiny_prepared, tmp_path):
    """``train/lr`` (and the progress bar's ``lr=``) at step s is the rate step s
    used: it was read after the scheduler had moved on to the next step's."""
    ds, labels = _data(tiny_prepared)
    rates = {}

    def log(metrics, step):
        if "train/lr" in metrics:
            rates[step] = metrics["train/lr"]

    fit(_model(labels), ds, CFG, Checkpoints(tmp_path / "c"), "fp", torch.device("cpu"), log=log,
        progress=False)  # fmt: skip
    f = lr_factor(CFG.warmup_iters, 3, CFG.lr_steps, CFG.gamma)  # 3 batches per epoch
    assert rates == {s: pytest.approx(CFG.lr * f(s - 1)) for s in range(1, 7)}


def test_resume_after_interruption_matches_uninterrupted_run(tiny_prepared, tmp_path):
    """Killed mid-epoch 2 and rerun: resumes from the epoch-1 checkpoint and ends
    with bit-identical weights on CPU (RNG state and data order are restored)."""
    ds, labels = _data(tiny_prepared)
    ref = _model(labels)
    fit(ref, ds, CFG, Checkpoints(tmp_path / "ref"), "fp", torch.device("cpu"), progress=False)

    steps = []

    def crash(metrics, step):
        steps.append(step)
        if step == 4:  # 3 batches per epoch: step 4 is mid-epoch 2
            raise KeyboardInterrupt

    ckpts = Checkpoints(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        fit(_model(labels), ds, CFG, ckpts, "fp", torch.device("cpu"), log=crash, progress=False)
    assert [p.name for p in ckpts.folder.iterdir()] == ["epoch_0001.pt"]
    resumed = _model(labels)
    logged = []
    out = fit(
        resumed,
        ds,
        CFG,
        ckpts,
        "fp",
        torch.device("cpu"),
        log=lambda m, s: logged.append(s),
        progress=False,
    )
    assert out["steps"] == 6 and logged[0] == 4  # continues at step 4, nothing repeated
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_changed_params_do_not_resume(tiny_prepared, tmp_path, capsys):
    """Other params/data/code: start over, exactly as a first run would."""
    ds, labels = _data(tiny_prepared)
    cfg1 = FitConfig(**{**CFG.__dict__, "epochs": 1})
    fresh = _model(labels)
    fit(
        fresh,
        ds,
        cfg1,
        Checkpoints(tmp_path / "fresh"),
        "fp-b",
        torch.device("cpu"),
        progress=False,
    )
    ckpts = Checkpoints(tmp_path / "c")
    fit(_model(labels), ds, cfg1, ckpts, "fp-a", torch.device("cpu"), progress=False)
    again = _model(labels)
    fit(again, ds, cfg1, ckpts, "fp-b", torch.device("cpu"), progress=False)
    assert "training from scratch" in capsys.readouterr().out
    for a, b in zip(fresh.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_new_weights_under_the_same_path_do_not_resume(tmp_path):
    """The pretrained file's bytes are part of the training's identity: a local
    file replaced in place (its path, the only param, unchanged) trains afresh,
    in a new MLflow run, rather than resuming checkpoints of the old weights; the
    sha256 of the file used is logged with the run and in weights.json beside the
    model, which a training from scratch then removes."""
    import hashlib

    import mlflow
    import yaml

    from rcnnops import train
    from rcnnops.config import load_params
    from rcnnops.data import prepare
    from rcnnops.data.shapes import generate
    from tests.code.trained import inside, write_project

    project = write_project(tmp_path / "p", ["faster_rcnn"])
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["faster_rcnn"]["model"]["pretrained"] = "start.pth"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with inside(project):
        p = load_params("params.yaml")
        generate(p.generate)
        prepare.run(p)
        torch.manual_seed(1)
        model = build_model("faster_rcnn", 3, p.variant("faster_rcnn").model)
        runs = []
        for scale in (1.0, 0.5):  # other bytes, same path
            torch.save({k: v * scale for k, v in model.state_dict().items()}, "start.pth")
            meta = train.run(p, "faster_rcnn", progress=False)
            logged = mlflow.get_run(meta["run_id"]).data.params["pretrained.sha256"]
            assert logged == hashlib.sha256(Path("start.pth").read_bytes()).hexdigest()
            runs.append(meta)
        report = json.loads(Path("models/faster_rcnn/weights.json").read_text())
        assert report["sha256"] == logged  # the report beside the model is the last run's
        params["train"]["faster_rcnn"]["model"].pop("pretrained")  # now from scratch
        Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        train.run(load_params("params.yaml"), "faster_rcnn", progress=False)
        # no report of weights the new model never had (weights.json is not a DVC output)
        assert not Path("models/faster_rcnn/weights.json").exists()
    first, second = runs
    assert second["params_hash"] != first["params_hash"]
    assert second["run_id"] != first["run_id"]  # not the first run resumed


def test_truncated_checkpoint_is_named(tiny_prepared, tmp_path):
    ds, labels = _data(tiny_prepared)
    ckpts = Checkpoints(tmp_path / "c")
    fit(
        _model(labels),
        ds,
        FitConfig(**{**CFG.__dict__, "epochs": 1}),
        ckpts,
        "fp",
        torch.device("cpu"),
        progress=False,
    )
    path = ckpts.latest()
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"epoch_0001.pt: cannot load checkpoint"):
        fit(_model(labels), ds, CFG, ckpts, "fp", torch.device("cpu"), progress=False)


def test_non_finite_loss_stops_with_clear_error(tiny_prepared, tmp_path):
    ds, labels = _data(tiny_prepared)
    cfg = FitConfig(**{**CFG.__dict__, "lr": 1e30, "clip_grad_norm": None, "warmup_iters": 0})
    with pytest.raises(TrainingDiverged, match="non-finite loss at epoch"):
        fit(
            _model(labels),
            ds,
            cfg,
            Checkpoints(tmp_path / "d"),
            "fp",
            torch.device("cpu"),
            progress=False,
        )


def test_corrupt_image_at_training_time_names_the_file(tiny_prepared):
    ds, _ = _data(tiny_prepared)
    path = ds.image_path(0)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(DataError, match=str(path)):
        ds[0]


def test_best_epoch_is_kept_and_patience_stops_early(tiny_prepared, tmp_path, capsys):
    """The validation metric peaks at epoch 2 and does not improve twice: training
    stops after epoch 4 and the kept weights are epoch 2's, bit for bit (a run of
    exactly 2 epochs), also after resuming from the epoch-3 checkpoint."""
    ds, labels = _data(tiny_prepared)
    scores = [0.1, 0.3, 0.2, 0.25, 0.9, 0.9]

    def validate(model, epoch):
        return {"val/bbox_AP": scores[epoch - 1]}

    six = dict(CFG.__dict__, epochs=6, lr_steps=[], select="val/bbox_AP", patience=2)
    cfg = FitConfig(**six)
    out = fit(_model(labels), ds, cfg, Checkpoints(tmp_path / "a"), "fp", torch.device("cpu"),
              validate, progress=False)  # fmt: skip
    assert out["epochs"] == 4 and out["best"]["epoch"] == 2 and out["best"]["value"] == 0.3
    assert "early stop after epoch 4: val/bbox_AP has not improved on epoch 2's 0.3000" in (
        capsys.readouterr().out
    )
    two = _model(labels)
    fit(two, ds, FitConfig(**dict(six, epochs=2)), Checkpoints(tmp_path / "b"), "fp",
        torch.device("cpu"), validate, progress=False)  # fmt: skip
    for k, v in two.state_dict().items():
        assert torch.equal(out["best"]["model"][k], v), k
    # Resumed from epoch 3's checkpoint: the best so far comes back with it.
    ckpts = Checkpoints(tmp_path / "c", keep=10)
    fit(_model(labels), ds, FitConfig(**dict(six, epochs=3)), ckpts, "fp", torch.device("cpu"),
        validate, progress=False)  # fmt: skip
    again = fit(_model(labels), ds, cfg, ckpts, "fp", torch.device("cpu"), validate,
                progress=False)  # fmt: skip
    assert again["epochs"] == 4 and again["best"]["epoch"] == 2
    for k, v in two.state_dict().items():
        assert torch.equal(again["best"]["model"][k], v), k


def test_multi_scale_training_sizes(tiny_prepared):
    """``min_size`` as a list: each training image at one of the sizes (torchvision's
    multi-scale), evaluation at the last."""
    model = build_model("faster_rcnn", 3, MODEL | {"min_size": [48, 64], "max_size": 64})
    image = torch.rand(3, 40, 40)
    model.train()
    seen = {tuple(model.transform([image])[0].image_sizes[0]) for _ in range(40)}
    assert seen == {(48, 48), (64, 64)}
    model.eval()
    assert model.transform([image])[0].image_sizes == [(64, 64)]
