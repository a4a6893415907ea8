"""The registered pyfunc model served over HTTP by `rcnnops serve`,
`rcnnops predict`, and request validation (masks included). The round trip in a
fresh process, for every variant, is in test_flow.py."""

import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from rcnnops import detect, registry
from rcnnops.cli import main
from rcnnops.serving import process as serve
from tests.code.trained import inside, train_and_register, write_project


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny project with faster_rcnn trained, evaluated, registered and champion."""
    root = write_project(tmp_path_factory.mktemp("serve") / "project", ["faster_rcnn"])
    assert train_and_register(root, ["faster_rcnn"]) == {"faster_rcnn": "1"}
    return root


def _png(size: tuple[int, int] = (64, 64)) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _val_image(project):
    return sorted((project / "data/raw/shapes/val").glob("*.png"))[0]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _post(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"{url}/invocations", json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_served_model_answers_images_and_refuses_the_rest(project, tmp_path):
    """`rcnnops serve` on a free loopback port, stopped afterwards."""
    port = serve.free_port()
    with open(tmp_path / "server.log", "wb") as log:
        proc = serve.start_server(
            project, "faster_rcnn", port, "--max-image-side", "64", "--max-images", "2",
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            serve.wait_until_up(url, proc)
        except serve.ServeError:
            pytest.fail((tmp_path / "server.log").read_text()[-3000:])
        image = _b64(_val_image(project).read_bytes())
        status, body = _post(
            url, {"dataframe_records": [{"image": image}], "params": {"score_threshold": 0.0}}
        )
        assert status == 200, body
        assert body["model_version"] == "1"
        (det,) = body["predictions"]
        assert det["boxes"] and len(det["boxes"]) == len(det["scores"]) == len(det["names"])
        assert all(0 <= v <= 64 for box in det["boxes"] for v in box)

        for payload, code, message in (
            ({"dataframe_records": [{"image": _b64(b"%PDF-1.4 not an image")}]}, 400,
             "not an image"),
            ({"dataframe_records": [{"image": "not base64!"}]}, 400, "not base64"),
            ({"dataframe_records": [{"image": _b64(_png((65, 40)))}]}, 413, "limit is 64"),
            ({"dataframe_records": [{"image": image}] * 3}, 413, "holds 3 images; the limit is 2"),
        ):  # fmt: skip
            status, body = _post(url, payload)
            assert status == code and message in body["message"], body
            assert "\n" not in body["message"] and "Traceback" not in body["message"]
        with pytest.raises(serve.ServeError, match=f"port {port} on 127.0.0.1 is in use"):
            serve.check_port_free("127.0.0.1", port)
    finally:
        serve.stop_server(proc)
    assert proc.poll() is not None
    # MLflow's download progress bars stay out of the server's log
    assert "Downloading artifacts" not in (tmp_path / "server.log").read_text()


def test_serve_command_refuses_a_port_in_use(project, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with inside(project):
            assert main(["serve", "faster_rcnn", "--port", str(port)]) == 2
    assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err


def test_predict_command_prints_json_and_draws(project, tmp_path, capsys):
    image = _val_image(project)
    with inside(project):
        code = main(
            ["predict", "faster_rcnn", str(image), "--score-threshold", "0", "--json"]
            + ["--draw", str(tmp_path / "drawn")]
        )
    assert code == 0
    (out,) = json.loads(capsys.readouterr().out)
    assert out["image"] == str(image) and out["boxes"]
    with Image.open(tmp_path / "drawn" / f"{image.stem}.png") as im:
        assert im.size[0] > 0


def test_bad_payloads_are_input_errors():
    with pytest.raises(detect.InputError, match="no 'image' column"):
        detect.images_from_input({"text": ["hello"]})
    with pytest.raises(detect.InputError, match="holds no images"):
        detect.images_from_input({"image": []})
    with pytest.raises(detect.InputError, match=r"row 1: no image"):
        detect.images_from_input({"image": [_b64(_png()), None]})
    with pytest.raises(detect.InputError, match="different numbers of rows: 'image' 2, 'array' 1"):
        detect.images_from_input({"image": [None, None], "array": [[[[1, 2, 3]]]]})
    with pytest.raises(detect.InputError, match=r"shape \[4, 4, 2\]"):
        detect.images_from_input({"array": [np.zeros((4, 4, 2), np.uint8)]})
    with pytest.raises(detect.InputError, match="integers in 0..255"):
        detect.images_from_input({"array": [np.full((4, 4, 3), 300)]})
    with pytest.raises(detect.TooLarge, match="limit is 32"):
        detect.images_from_input({"image": [_b64(_png((40, 8)))]}, detect.ImageLimits(max_side=32))
    with pytest.raises(detect.TooLarge, match="1,600 pixels; the limit is 1,000"):
        detect.images_from_input(
            {"image": [_b64(_png((40, 40)))]}, detect.ImageLimits(max_pixels=1000)
        )
    with pytest.raises(detect.TooLarge, match="holds 2 images; the limit is 1"):
        detect.images_from_input({"image": [_b64(_png())] * 2}, detect.ImageLimits(max_images=1))
    with pytest.raises(detect.InputError, match="is 130x2, more than 64:1"):
        detect.images_from_input({"image": [_b64(_png((130, 2)))]})
    grey = detect.images_from_input([[[0, 255], [7, 9]]])[0].pixels
    assert grey.shape == (2, 2, 3) and grey.dtype == np.uint8


def test_masks_are_returned_as_coco_rle():
    """A Mask R-CNN-shaped output: masks [N, 1, H, W] probabilities -> RLE at 0.5."""
    from rcnnops.data.masks import decode

    masks = torch.zeros(2, 1, 6, 8)
    masks[0, 0, 1:3, 2:5] = 0.9
    masks[1, 0, 4:, :] = 0.4  # below the 0.5 mask threshold: empty
    output = {
        "boxes": torch.tensor([[2.0, 1.0, 5.0, 3.0], [0.0, 4.0, 8.0, 6.0]]),
        "labels": torch.tensor([1, 2]),
        "scores": torch.tensor([0.9, 0.6]),
        "masks": masks,
    }
    det = detect.to_detections(output, ("circle", "square"), score_threshold=0.5)
    assert det["names"] == ["circle", "square"] and len(det["masks"]) == 2
    assert all(isinstance(m["counts"], str) and m["size"] == [6, 8] for m in det["masks"])
    first = decode(det["masks"][0], 8, 6)
    assert first.sum() == 6 and first[1:3, 2:5].all()
    assert decode(det["masks"][1], 8, 6).sum() == 0
    assert detect.to_detections(output, ("circle", "square"), 0.95)["masks"] == []
    json.dumps(det)  # JSON-ready as the server returns it


def test_serve_and_predict_take_a_device(project, tmp_path, capsys):
    """``--device``: the model loads where asked (``auto`` is the CPU here); a GPU
    asked for on a machine without one is a one-line error, before any loading."""
    image = _val_image(project)
    with inside(project):
        assert main(["predict", "faster_rcnn", str(image), "--json", "--device", "cpu"]) == 0
        on_cpu = json.loads(capsys.readouterr().out)
        assert main(["predict", "faster_rcnn", str(image), "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == on_cpu
        model = registry.load_pyfunc("faster_rcnn", model_config={"device": "cpu"})
        assert str(model.unwrap_python_model().detector.device) == "cpu"
        if not torch.cuda.is_available():
            for cmd in (["predict", "faster_rcnn", str(image)], ["serve", "faster_rcnn"]):
                assert main([*cmd, "--device", "cuda"]) == 2
                assert "no CUDA device is available" in capsys.readouterr().err
    from rcnnops.cli import build_parser
    from rcnnops.cli.serving import model_config, serve_settings

    with inside(project):  # flags over params.yaml's serve section
        args = build_parser().parse_args(["serve", "faster_rcnn", "--device", "cuda:1"])
        config = model_config(serve_settings(args))
    assert config["device"] == "cuda:1" and config["max_image_pixels"] == 50_000_000


def test_predict_explains_bad_inputs_in_one_line(project, tmp_path, capsys):
    """A folder, a text file named .png and a threshold out of range: one line
    each, exit 2, no traceback."""
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    cases = [
        (["predict", "faster_rcnn", str(tmp_path)], "is a folder; name the image files"),
        (["predict", "faster_rcnn", str(fake)], f"error: {fake}: not an image file"),
    ]
    with inside(project):
        for argv, message in cases:
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert message in err and "Traceback" not in err, err
        with pytest.raises(SystemExit) as exit_:
            main(["predict", "faster_rcnn", str(fake), "--score-threshold", "2"])
        assert exit_.value.code == 2
        assert "must be in [0, 1], got 2.0" in capsys.readouterr().err


def test_incomplete_model_json_names_what_is_missing(project, tmp_path):
    import shutil

    from rcnnops.models.io import CheckpointError, load_model

    bundle = tmp_path / "model_dir"
    shutil.copytree(project / "models" / "faster_rcnn", bundle)
    meta = json.loads((bundle / "model.json").read_text())
    num_classes = meta.pop("num_classes")
    (bundle / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"incomplete \(no num_classes\).*rcnnops promote"):
        load_model(bundle)
    del meta["labels"]
    meta["num_classes"] = num_classes
    (bundle / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"incomplete \(no labels\)"):
        detect.Detector.from_dir(bundle, "cpu")


FLOW_PROBE = """
import json, sys
from pathlib import Path
from rcnnops import compare, registry
from rcnnops.config import load_params
from rcnnops.data.prepare import load_manifest
registry.warm_up()
p = load_params(Path("params.yaml"))
load_manifest(Path(p.prepare.out))
r = registry.register_variant(p, "faster_rcnn")
d = registry.promote_variant(p, "faster_rcnn", r.version)
compare.collect(p, ["faster_rcnn"])
drawn = compare.side_by_side_in_a_process(Path("params.yaml"), ["faster_rcnn"])
print(json.dumps({"created": r.created, "promoted": d.promoted, "drawn": str(drawn),
                  "torch": "torch" in sys.modules, "pyplot": "matplotlib.pyplot" in sys.modules}))
"""


def test_the_flow_registers_promotes_and_compares_without_torch(project, tmp_path):
    """What the flow's process does besides running stages (manifest, warm-up,
    register, promote, compare; its picture drawn by a process of its own) never
    loads torch, nor matplotlib (about 4 s of CPU and 0.5 GB on
    every run): the evaluate stage checked the model as served, and its record
    (serving_check.json) spares registration loading it again."""
    import os
    import shutil
    import subprocess
    import sys

    copy = tmp_path / "project"
    shutil.copytree(project, copy)
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'fresh.db'}"}
    out = subprocess.run(
        [sys.executable, "-c", FLOW_PROBE], cwd=copy, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    drawn = "reports/compare/side_by_side.png"  # drawn by a process of its own
    assert result == {
        "created": True, "promoted": True, "drawn": drawn, "torch": False, "pyplot": False
    }  # fmt: skip
    assert (copy / drawn).read_bytes().startswith(b"\x89PNG")
    # the same without the record: registration loads the model to check it
    (copy / "reports" / "faster_rcnn" / "serving_check.json").unlink()
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'fresh2.db'}"
    out = subprocess.run(
        [sys.executable, "-c", FLOW_PROBE], cwd=copy, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["torch"] is True


def test_evaluate_checks_the_model_as_served(project, tmp_path, monkeypatch):
    """The evaluate stage fails on a model that does not load or predict as served
    (saved as the registry logs it, loaded as a server loads it), leaving no
    metrics.json and no record; the record of a passed check names what was checked
    and stops matching when the bundle or the package's code changes."""
    import shutil
    from pathlib import Path

    from rcnnops import evaluate, pyfunc, serving_check
    from rcnnops.config import load_params

    copy = tmp_path / "project"
    shutil.copytree(project, copy)
    report = copy / "reports" / "faster_rcnn"
    record = report / serving_check.CHECK_FILE
    with inside(copy):
        params = load_params(Path("params.yaml"))
        with monkeypatch.context() as m:
            boom = lambda self, context: (_ for _ in ()).throw(RuntimeError("no GPU 7"))  # noqa: E731
            m.setattr(pyfunc.DetectorPyfunc, "load_context", boom)
            with pytest.raises(evaluate.NotServable, match=r"models/faster_rcnn: the model "
                               r"does not work as served.*RuntimeError: no GPU 7"):  # fmt: skip
                evaluate.run(params, "faster_rcnn", progress=False)
        assert not (report / "metrics.json").exists() and not record.exists()
        evaluate.run(params, "faster_rcnn", progress=False)
        done = json.loads(record.read_text())
        assert set(done["bundle"]) == {"model.pt", "model.json", "serving.json"}
        served = {"pyfunc.py", "pyfunc_model.py", "detect.py", "serving_check.py"}
        assert served <= set(done["code"])
        serving = serving_check.serving_settings(params, "faster_rcnn")
        bundle = serving_check.write_bundle(Path("models/faster_rcnn"), tmp_path / "b", serving)
        assert serving_check.checked(bundle, record)
        other = {"svd_rank": 4}
        other = serving_check.write_bundle(Path("models/faster_rcnn"), tmp_path / "c", other)
        assert not serving_check.checked(other, record)
        done["code"]["pyfunc.py"] = "0" * 64  # as if the served code had changed since
        record.write_text(json.dumps(done))
        assert not serving_check.checked(bundle, record)


def test_register_refuses_a_model_its_metrics_did_not_measure(project, tmp_path):
    """metrics.json names the model.pt it measured (model_hash): a truncated or
    replaced model.pt, or one that does not load, registers nothing."""
    import shutil

    from rcnnops.files import sha256_file
    from rcnnops.registry.store import RegistryError, versions

    model_dir, report_dir = tmp_path / "faster_rcnn", tmp_path / "report"
    shutil.copytree(project / "models" / "faster_rcnn", model_dir)
    shutil.copytree(project / "reports" / "faster_rcnn", report_dir)
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert metrics["model_hash"] == sha256_file(model_dir / "model.pt")
    pt = model_dir / "model.pt"
    pt.write_bytes(pt.read_bytes()[:5000])
    with inside(project):
        before = len(versions(registry.model_name("faster_rcnn")))
        register = lambda: registry.register(  # noqa: E731
            "faster_rcnn", model_dir, report_dir, "rcnnops-test"
        )
        with pytest.raises(RegistryError, match="was measured on another model.pt"):
            register()
        metrics["model_hash"] = sha256_file(pt)  # metrics that claim the broken file
        (report_dir / "metrics.json").write_text(json.dumps(metrics))
        # MLflow's check of the logged model (load it as served, predict the input
        # example) only warns: registration refuses instead, saying why
        with pytest.raises(RegistryError, match="does not work as served.*cannot load model"):
            register()
        assert len(versions(registry.model_name("faster_rcnn"))) == before


def test_a_model_trained_against_another_store_registers_in_this_one(
    project, tmp_path, monkeypatch, capfd
):
    """A clone with its own mlflow.db pulls a model whose training run is in the
    teammate's store: it registers in a run made for it (naming the training run,
    holding the evaluation metrics), and a failed registration leaves no run, also
    when the logged model fails MLflow's check of it as served (run here when the
    evaluate stage's record of that check is missing). With the record, the model is
    not loaded at all. Registering prints no progress bars (MLflow drew three for its
    check's copy of the model) and no warning (the served device's config key
    clashed with the training's param)."""
    import shutil

    import pandas as pd

    from rcnnops import pyfunc, serving_check, tracking
    from rcnnops.registry.store import RegistryError

    clone = tmp_path / "clone"
    for part in ("models/faster_rcnn", "reports/faster_rcnn"):
        shutil.copytree(project / part, clone / part)
    for f in ("params.yaml", "dvc.yaml"):
        shutil.copy(project / f, clone / f)
    trained_in = json.loads((project / "models/faster_rcnn/model.json").read_text())["run_id"]
    metrics = json.loads((clone / "reports/faster_rcnn/metrics.json").read_text())
    from rcnnops.config import load_params

    serving = registry.serving_settings(load_params(clone / "params.yaml"), "faster_rcnn")
    register = lambda: registry.register(  # noqa: E731
        "faster_rcnn",
        clone / "models/faster_rcnn",
        clone / "reports/faster_rcnn",
        "rcnnops-test",
        serving=serving,  # as evaluation ran it (the flow's register_variant passes it)
    )
    with inside(clone):
        with monkeypatch.context() as m:
            m.setattr(
                pyfunc, "log", lambda bundle, **_: (_ for _ in ()).throw(OSError("disk full"))
            )
            with pytest.raises(OSError, match="disk full"):
                register()
        record = clone / "reports/faster_rcnn" / serving_check.CHECK_FILE
        kept = record.read_bytes()
        boom = lambda self, context: (_ for _ in ()).throw(RuntimeError("no GPU 7"))  # noqa: E731
        with monkeypatch.context() as m:
            m.setattr(pyfunc.DetectorPyfunc, "load_context", boom)
            record.unlink()
            with pytest.raises(RegistryError, match=r"does not work as served.*no GPU 7"):
                register()
            client = tracking.client()
            exp = client.get_experiment_by_name("rcnnops-test")
            assert client.search_runs([exp.experiment_id]) == []  # no stray run
            record.write_bytes(kept)  # the evaluate stage checked this very bundle: not loaded
            capfd.readouterr()
            r = register()
        err = capfd.readouterr().err
        assert "Downloading artifacts" not in err and "WARNING" not in err, err
        assert (r.version, r.created, r.trained_in_run) == ("1", True, trained_in)
        mv = client.get_model_version("rcnnops-faster_rcnn", "1")
        run = client.get_run(mv.run_id)
        assert mv.tags["run_id"] == mv.run_id != trained_in
        assert mv.tags["trained_in_run"] == run.data.tags["rcnnops.trained_in_run"] == trained_in
        assert run.info.status == "FINISHED"
        assert run.data.metrics["bbox_AP"] == metrics["bbox_AP"]
        assert register().created is False  # idempotent: no second run, no second version
        assert len(client.search_runs([exp.experiment_id])) == 1
        detect = registry.load_pyfunc("faster_rcnn", "challenger", "rcnnops-test")
        img = base64.b64encode(_val_image(project).read_bytes()).decode()
        assert len(detect.predict(pd.DataFrame({"image": [img]}))) == 1


def test_what_the_mlflow_ui_shows(project):
    """The experiment opens on training runs (its kind tag); the training run lists
    its train/val datasets (digest: the prepared splits' content hashes, source:
    the DVC-tracked files); the registered model and version have descriptions."""
    from rcnnops import pyfunc, tracking

    with inside(project):
        tracking.setup("rcnnops-test")
        client = tracking.client()
        exp = client.get_experiment_by_name("rcnnops-test")
        assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
        mv = client.get_model_version("rcnnops-faster_rcnn", "1")
        run = client.get_run(mv.run_id)
        model = client.get_registered_model("rcnnops-faster_rcnn")
        (logged,) = client.search_logged_models(
            [exp.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
        )
    manifest = json.loads((project / "data/prepared/manifest.json").read_text())
    inputs = {
        d.dataset.name: (d.dataset.digest, json.loads(d.dataset.source), [t.value for t in d.tags])
        for d in run.inputs.dataset_inputs
    }
    assert inputs == {
        "train": (manifest["splits"]["train"]["hash"][:32], {"uri": "data/prepared/train.json"},
                  ["training"]),
        "val": (manifest["splits"]["val"]["hash"][:32], {"uri": "data/prepared/val.json"},
                ["validation"]),
    }  # fmt: skip
    # logging the model at registration adds to the training run without ending it
    # again: its duration in the UI is its training and evaluation
    assert run.info.status == "FINISHED"
    assert run.info.end_time < logged.creation_timestamp
    # MLflow logs the model's config as the run's params; the served device's key
    # is not the training's `device` (a clash made MLflow log none of them)
    assert run.data.params["device"] == "cpu"
    assert run.data.params["serve_device"] == "auto"
    assert run.data.params["max_images"] == str(pyfunc.LOGGED_CONFIG["max_images"])
    assert "`champion` is what `rcnnops serve` follows" in model.description
    assert mv.description.startswith(f"`faster_rcnn` trained on data {manifest['data_hash']}")
    assert "bbox_AP" in mv.description and "Gate: promoted" in mv.description


def test_loading_the_model_prints_no_advice_and_keeps_the_signature(project):
    """MLflow warned, in every process that made the pyfunc class (each `rcnnops run`,
    the served model's log), to add type hints to ``predict``; the hint it now has
    is one MLflow takes no schema from, so the logged signature is still the one
    rcnnops gives, and a load in a fresh process is quiet."""
    from rcnnops import pyfunc, tracking

    load = (
        "import mlflow.pyfunc, sys\n"
        "m = mlflow.pyfunc.load_model('models:/rcnnops-faster_rcnn@champion')\n"
        "print(m.metadata.signature.to_dict()['inputs'])\n"
    )
    env = {"MLFLOW_TRACKING_URI": tracking.tracking_uri(project), "PYTHONWARNINGS": "default"}
    done = subprocess.run(
        [sys.executable, "-c", load], cwd=project, capture_output=True, text=True,
        env=os.environ | env, timeout=300, check=True,
    )  # fmt: skip
    assert "type hint" not in done.stderr.lower()
    assert json.loads(done.stdout) == json.loads(pyfunc.signature().to_dict()["inputs"])


def test_device_reaches_the_model_for_versions_logged_before_and_after(project, tmp_path, caplog):
    """MLflow hands ``load_context`` only the config keys a version logged, and
    versions logged without ``device`` got every ``--device`` dropped (with a
    warning): the model ran on ``auto``. A device that cannot be used (no
    ``cuda:7`` here) shows it reaches the model, for a version as now logged and
    for one whose MLmodel lacks the key, as older versions do."""
    import shutil

    import mlflow.artifacts
    import mlflow.pyfunc
    import yaml

    from rcnnops import pyfunc
    from rcnnops.device import DeviceError

    with inside(project):
        new = mlflow.artifacts.download_artifacts(
            "models:/rcnnops-faster_rcnn/1", dst_path=str(tmp_path / "new")
        )
    old = shutil.copytree(new, tmp_path / "old")
    meta = yaml.safe_load((old / "MLmodel").read_text())
    assert meta["flavors"]["python_function"]["config"].pop("serve_device") == "auto"
    (old / "MLmodel").write_text(yaml.safe_dump(meta))
    interim = shutil.copytree(new, tmp_path / "interim")  # logged the key as `device`
    meta = yaml.safe_load((interim / "MLmodel").read_text())
    config = meta["flavors"]["python_function"]["config"]
    config["device"] = config.pop("serve_device")
    (interim / "MLmodel").write_text(yaml.safe_dump(meta))
    for path in (new, str(old), str(interim)):
        if not torch.cuda.is_available():
            with pytest.raises(DeviceError, match="cuda:7"):
                pyfunc.load(path, {"device": "cuda:7"})
        model = pyfunc.load(path, {"device": "cpu", "max_images": 3}).unwrap_python_model()
        assert (str(model.detector.device), model.limits.max_images) == ("cpu", 3)
    # MLflow's own load takes the logged key
    for path, key in ((new, "serve_device"), (str(interim), "device")):
        if not torch.cuda.is_available():
            with pytest.raises(DeviceError, match="cuda:7"):
                mlflow.pyfunc.load_model(path, model_config={key: "cuda:7"})
    assert "were ignored" not in caplog.text


def test_a_version_that_cannot_load_and_a_registry_that_is_down_are_one_line(
    project, tmp_path, capsys, monkeypatch
):
    """Artifacts gone (a copied project, a wiped store): `serve` and `predict` said
    so in a traceback naming a temporary folder; now one line naming the version
    and where its artifacts are. A tracking server that is down: `serve` waited
    for MLflow's retries (about 4 min) then gave a traceback, and a running server's
    poll held ``/health`` at ok as long; now a 5 s probe says so."""
    from rcnnops import tracking
    from rcnnops.serving import follower
    from rcnnops.serving.process import free_port

    (tmp_path / "gone").mkdir()
    with inside(project):
        tracking.setup("rcnnops-test")
        client = tracking.client()
        mv = client.create_model_version(
            "rcnnops-faster_rcnn", source=(tmp_path / "gone").as_uri(), tags={"variant": "x"}
        )
        client.set_registered_model_alias("rcnnops-faster_rcnn", "broken", mv.version)
        try:
            assert main(["serve", "faster_rcnn", "--version", str(mv.version)]) == 2
            err = capsys.readouterr().err
            assert f"error: rcnnops-faster_rcnn v{mv.version} cannot be served: " in err
            assert f"(its artifacts: {(tmp_path / 'gone').as_uri()})" in err
            assert (
                main(["predict", "faster_rcnn", str(_val_image(project)), "--alias", "broken"]) == 2
            )
            err = capsys.readouterr().err
            assert f"v{mv.version} (broken) cannot be loaded: " in err and "Traceback" not in err
        finally:
            client.delete_model_version("rcnnops-faster_rcnn", mv.version)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
        t0 = time.monotonic()
        assert main(["serve", "faster_rcnn"]) == 2
        assert "does not answer" in capsys.readouterr().err
        with pytest.raises(tracking.TrackingUnavailable, match="still serving the version"):
            follower._resolve_alias("rcnnops-faster_rcnn", "champion")
        assert time.monotonic() - t0 < 30


def test_predict_takes_any_number_of_files_and_keeps_every_drawing(
    project, tmp_path, capsys, monkeypatch
):
    """More files than a request holds (``max_images``) are predicted in batches
    (they were refused); two images with one stem each keep their drawing (the
    second overwrote the first); a ``--draw`` that is a file fails before any work;
    a large photo is drawn at most MAX_DRAWN_SIDE pixels wide (a 50 M-pixel photo
    took 5 GB drawn at twice its size)."""
    from rcnnops.serving import files

    image = _val_image(project)
    other = tmp_path / "b" / image.name
    other.parent.mkdir()
    with Image.open(image) as im:
        im.save(other)
        im.resize((im.width * 10, im.height * 10)).save(tmp_path / "large.png")
    args = [str(image), str(other), str(tmp_path / "large.png")]
    with inside(project):
        assert main(["predict", "faster_rcnn", *args, "--json", "--max-images", "1"]) == 0
        single = json.loads(capsys.readouterr().out)
        assert [d["image"] for d in single] == args
        assert main(["predict", "faster_rcnn", *args, "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == single
        (tmp_path / "afile").write_text("")
        assert main(["predict", "faster_rcnn", *args, "--draw", str(tmp_path / "afile")]) == 2
        out = capsys.readouterr()
        assert out.err.endswith(f"error: --draw {tmp_path / 'afile'}: not a folder\n")
        assert out.out == ""  # nothing predicted or printed before the error
        monkeypatch.setattr(files, "MAX_DRAWN_SIDE", 1000)
        assert main(["predict", "faster_rcnn", *args, "--draw", str(tmp_path / "d")]) == 0
    drawn = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert drawn == [f"{image.stem}-2.png", f"{image.stem}.png", "large.png"]
    with Image.open(tmp_path / "d" / "large.png") as im:
        assert max(im.size) == 1000
    with Image.open(tmp_path / "d" / f"{image.stem}.png") as im, Image.open(image) as src:
        assert im.size == (src.width * 2, src.height * 2)  # small: drawn twice as large


def test_an_interrupted_evaluation_leaves_no_earlier_metrics_beside_new_predictions(
    project, monkeypatch
):
    """Killed after writing predictions.json, evaluate left the previous
    metrics.json, whose presence says the report is complete: `compare` showed the
    old AP over the new detections."""
    from rcnnops import evaluate
    from rcnnops.config import load_params

    reports = project / "reports/faster_rcnn"
    assert (reports / "metrics.json").is_file()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for the kill: after the predictions

    with inside(project):
        p = load_params("params.yaml")
        with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
            patched.setattr(evaluate, "plot_pr", killed)
            evaluate.run(p, "faster_rcnn", progress=False)
        assert not (reports / "metrics.json").exists()
        assert isinstance(json.loads((reports / "predictions.json").read_text()), list)
        assert not [f for f in reports.iterdir() if f.name.endswith(".tmp")]
        assert evaluate.run(p, "faster_rcnn", progress=False)["bbox_AP"] >= 0
    assert (reports / "metrics.json").is_file()
