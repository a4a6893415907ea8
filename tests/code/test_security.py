"""Security (issue 6, item 7, data and secrets): dataset file names cannot escape
their folder; secrets in the environment never reach MLflow params, tags or
artifacts; weights files carrying a pickle payload are refused without running it."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from rcnnops import tracking
from rcnnops.data.dataset import DetectionDataset
from rcnnops.data.io import DataError, safe_image_path
from rcnnops.data.prepare import load_split
from rcnnops.data.validate import validate_coco
from tests.conftest import TINY_PARAMS

# --- file names ----------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path) -> Path:
    """root/ with a.png, sub/b.png, and next to it outside/secret.png."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    for p in (root / "a.png", root / "sub" / "b.png", tmp_path / "outside" / "secret.png"):
        Image.new("RGB", (8, 8)).save(p)
    return root


ESCAPES = {
    "absolute": ("/etc/passwd", "escapes the image folder"),
    "absolute into root": ("{root}/a.png", "escapes the image folder"),
    "parent": ("../outside/secret.png", "escapes the image folder"),
    "parent inside": ("sub/../a.png", "escapes the image folder"),  # refused all the same
    "deep parent": ("sub/../../outside/secret.png", "escapes the image folder"),
    "file symlink out": ("link.png", "resolves outside the image folder"),
    "dir symlink out": ("linkdir/secret.png", "resolves outside the image folder"),
    "symlink chain out": ("chain.png", "resolves outside the image folder"),
    "symlink loop": ("loop.png", "cannot be resolved"),
    "NUL": ("a.png\x00.jpg", "is not a valid path"),
    "lone surrogate": ("a\ud800.png", "is not a valid path"),
    "empty": ("", "must be a non-empty string"),
    "not a string": (7, "must be a non-empty string"),
}


def _links(root: Path) -> None:
    outside = root.parent / "outside"
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "linkdir").symlink_to(outside)
    (root / "hop.png").symlink_to(root / "link.png")
    (root / "chain.png").symlink_to("hop.png")
    (root / "inner.png").symlink_to("sub/b.png")  # stays inside: fine
    (root / "loop.png").symlink_to("loop.png")


@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_file_names_cannot_escape_the_image_folder(tree, case):
    _links(tree)
    name, message = ESCAPES[case]
    name = name.format(root=tree) if isinstance(name, str) else name
    with pytest.raises(DataError, match=f"image id 1: .*{message}"):
        safe_image_path(tree, name, "image id 1")
    coco = {
        "images": [{"id": 1, "file_name": name, "width": 8, "height": 8}],
        "annotations": [],
        "categories": [{"id": 1, "name": "x"}],
    }
    with pytest.raises(DataError, match=f"ann.json: image id 1: .*{message}"):
        validate_coco(coco, Path("ann.json"), tree)


def test_names_inside_the_folder_resolve(tree):
    _links(tree)
    assert safe_image_path(tree, "sub/b.png", "x") == (tree / "sub" / "b.png").resolve()
    assert safe_image_path(tree, "inner.png", "x") == (tree / "sub" / "b.png").resolve()
    assert safe_image_path(tree, "./a.png", "x") == (tree / "a.png").resolve()


def test_too_long_a_name_is_a_data_error(tree):
    coco = {
        "images": [{"id": 1, "file_name": "x" * 5000, "width": 8, "height": 8}],
        "annotations": [],
        "categories": [{"id": 1, "name": "x"}],
    }
    with pytest.raises(DataError, match="ann.json: image id 1: image file .*File name too long"):
        validate_coco(coco, Path("ann.json"), tree)


@settings(max_examples=200, deadline=None)
@given(
    name=st.lists(
        st.sampled_from(["..", ".", "", "a.png", "sub", "b.png", "link.png", "linkdir", "/", "~"])
        | st.text(max_size=6),
        min_size=1,
        max_size=5,
    ).map("/".join)
)
def test_fuzz_file_names_resolve_inside_or_are_refused(tmp_path_factory, name):
    base = tmp_path_factory.getbasetemp() / "names"
    root = base / "root"
    if not root.exists():
        (root / "sub").mkdir(parents=True)
        (base / "outside").mkdir()
        Image.new("RGB", (8, 8)).save(base / "outside" / "secret.png")
        Image.new("RGB", (8, 8)).save(root / "sub" / "b.png")
        _links(root)
    try:
        path = safe_image_path(root, name, "image id 1")
    except DataError:
        return
    assert path.is_relative_to(root.resolve())
    assert not (path.exists() and path.resolve() == (base / "outside" / "secret.png").resolve())


def test_symlink_planted_after_prepare_is_refused_when_training_reads(tiny_prepared, tmp_path):
    """The dataset re-checks every path when it reads pixels, not only prepare."""
    coco, root, labels = load_split(tiny_prepared, "train")
    first = root / coco["images"][0]["file_name"]
    secret = tmp_path / "secret.png"
    secret.write_bytes(first.read_bytes())
    first.unlink()
    first.symlink_to(secret)
    ds = DetectionDataset(coco, root, labels)
    with pytest.raises(DataError, match="resolves outside the image folder"):
        ds[0]


# --- secrets in the environment ---------------------------------------------------------------

SECRET_VARS = [
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "GITHUB_TOKEN",
    "HF_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "DATABASE_PASSWORD",
    "RCNNOPS_API_KEY",
    "SSH_PRIVATE_KEY",
]


@pytest.fixture
def secrets(monkeypatch) -> dict[str, str]:
    """Each secret variable set to its own distinctive value."""
    values = {k: f"canary-{k.lower()}-{uuid.uuid4().hex}" for k in SECRET_VARS}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    return values


def _everything_logged(uri: str) -> list[str]:
    """Every param, tag, alias and model-version tag (keys and values) in a store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    seen: list[str] = []
    for exp in client.search_experiments():
        seen += [exp.name, *(f"{k}={v}" for k, v in exp.tags.items())]
        for run in client.search_runs([exp.experiment_id]):
            seen += [f"{k}={v}" for k, v in run.data.params.items()]
            seen += [f"{k}={v}" for k, v in run.data.tags.items()]
    for rm in client.search_registered_models():
        seen += [f"{k}={v}" for k, v in rm.tags.items()] + list(rm.aliases)
        for mv in client.search_model_versions(f"name='{rm.name}'"):
            seen += [f"{k}={v}" for k, v in mv.tags.items()]
    return seen


def _assert_nowhere(secrets: dict[str, str], project: Path, min_logged: int) -> None:
    uri = f"sqlite:///{project / 'mlflow.db'}"
    logged = _everything_logged(uri)
    assert len(logged) >= min_logged  # the scan did see what was logged
    files = [p for p in project.rglob("*") if p.is_file()]
    for name, value in secrets.items():
        assert not [s for s in logged if value in s], f"{name} logged"
        leaked = [p for p in files if value.encode() in p.read_bytes()]
        assert not leaked, f"{name} written to {leaked}"


@pytest.mark.reliability  # ~15-20 s: a real (tiny) training, evaluation and registration
def test_env_secrets_reach_no_param_tag_or_artifact(secrets, tmp_path):
    """The real tiny training, evaluation, registration and promotion, then a scan
    of the whole store (database and artifact files) and project for the values."""
    from tests.code.trained import train_and_register, write_project

    project = write_project(tmp_path / "project", ["faster_rcnn"])
    assert train_and_register(project, ["faster_rcnn"]) == {"faster_rcnn": "1"}
    _assert_nowhere(secrets, project, min_logged=40)
    assert any("mlartifacts" in p.parts for p in project.rglob("*.json"))


def test_scrub_drops_secret_keys_and_redacts_secret_values(secrets, tmp_path):
    from tests.code.trained import inside

    token = secrets["GITHUB_TOKEN"]
    values = {
        "data.root": f"https://user:{token}@example.com/data",
        "aws_secret_access_key": "x",
        "hf_token": "y",
        "train.lr": 0.01,
        "note": "short values like 'abc' are kept",
    }
    assert tracking.scrub(values) == {
        "data.root": tracking.REDACTED,
        "train.lr": 0.01,
        "note": "short values like 'abc' are kept",
    }
    with inside(tmp_path):
        with tracking.stage_run("secrets", "t", tags={"source": f"s3://{token}@b"}):
            tracking.log_params(values)
            tracking.set_tags({"url": f"x{secrets['AWS_SESSION_TOKEN']}x", "ok": "fine"})
        _assert_nowhere(secrets, tmp_path, min_logged=5)
        logged = _everything_logged(f"sqlite:///{tmp_path / 'mlflow.db'}")
        assert "data.root=<redacted>" in logged and "ok=fine" in logged
        # The scan is not blind: a tag set past the helpers is caught.
        import mlflow

        with mlflow.start_run():
            mlflow.set_tag("leak", token)
        with pytest.raises(AssertionError, match="GITHUB_TOKEN logged"):
            _assert_nowhere(secrets, tmp_path, min_logged=5)


# --- pickle payloads in weights files -----------------------------------------------------------


class Payload:
    """Unpickling this runs code: it writes ``marker`` (a harmless stand-in for an attack)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A real (untrained) tiny Faster R-CNN saved as the train stage saves it."""
    from rcnnops.models import build_model
    from rcnnops.models.io import save_model

    params = yaml.safe_load(TINY_PARAMS)["train"]["faster_rcnn"]["model"]
    model = build_model("faster_rcnn", 3, params)
    meta = {"variant": "faster_rcnn", "num_classes": 3, "model_params": params}
    save_model(model, tmp_path / "model", meta)
    return tmp_path / "model"


@pytest.mark.parametrize("where", ["whole file", "inside the state dict"])
def test_weights_with_a_pickle_payload_are_refused_and_never_run(model_dir, tmp_path, where):
    from rcnnops.checkpoints import Checkpoints
    from rcnnops.models.io import CheckpointError, load_model
    from rcnnops.models.weights import load_pretrained

    model, _ = load_model(model_dir)  # the honest file loads
    marker = tmp_path / "pwned"
    evil = Payload(marker)
    state = torch.load(model_dir / "model.pt", weights_only=True)
    torch.save(evil if where == "whole file" else state | {"extra": evil}, model_dir / "model.pt")
    # The payload is live: an unsafe load would run it (the control).
    torch.load(model_dir / "model.pt", weights_only=False)
    assert marker.read_text() == "pwned"
    marker.unlink()

    with pytest.raises(CheckpointError, match=r"model.pt: cannot load model weights .*") as err:
        load_model(model_dir)
    assert "dvc repro -f train@faster_rcnn" in str(err.value)
    assert "Traceback" not in str(err.value)
    ckpt = Checkpoints(tmp_path / "ckpt")
    ckpt.folder.mkdir()
    (ckpt.folder / "epoch_0001.pt").write_bytes((model_dir / "model.pt").read_bytes())
    with pytest.raises(CheckpointError, match=r"epoch_0001.pt: cannot load checkpoint"):
        ckpt.load(ckpt.latest())
    with pytest.raises(ValueError, match=r"model.pt: not a loadable weights file"):
        load_pretrained(model, model_dir / "model.pt")
    assert not marker.exists()
