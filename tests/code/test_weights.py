"""Weights by torchvision name or local file: every tensor accounted for.

No download ever: the files are made here from torchvision's constructors
(``weights=None``) and placed in a temporary ``$TORCH_HOME`` under the real
weights files' names, as a user (or a first online run) would have them.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path

import pytest
import torch
from torchvision import models as tvm
from torchvision.models import get_weight

from rcnnops.models import build_model
from rcnnops.models.weights import WeightsError, hub_dir, load_pretrained
from rcnnops.presets import FASTERRCNN_RESNET50_FPN, TORCHVISION_DETECTORS


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub_dir().mkdir(parents=True)
    return hub_dir()


def place(name: str, state: dict) -> str:
    """Save ``state`` where torchvision's weights ``name`` is cached; its spec."""
    url = get_weight(name).url
    torch.save(state, hub_dir() / os.path.basename(url))
    return f"torchvision:{name}"


CLASSIFIERS = [
    ("resnet18_fpn", tvm.resnet18, "ResNet18_Weights.IMAGENET1K_V1", "fc."),
    ("resnet50_fpn", tvm.resnet50, "ResNet50_Weights.IMAGENET1K_V2", "fc."),
    ("mobilenet_v3_fpn", tvm.mobilenet_v3_large, "MobileNet_V3_Large_Weights.IMAGENET1K_V1",
     "classifier."),
    ("vgg16", tvm.vgg16, "VGG16_Weights.IMAGENET1K_V1", "classifier."),  # the papers' network
]  # fmt: skip


@pytest.mark.parametrize(("backbone", "ctor", "name", "head"), CLASSIFIERS, ids=lambda v: str(v))
def test_imagenet_weights_fill_the_whole_body(torch_home, backbone, ctor, name, head):
    torch.manual_seed(0)
    state = ctor(weights=None).state_dict()
    spec = place(name, state)
    model = build_model("faster_rcnn", 3, {"backbone": backbone, "pretrained": spec})
    report = load_pretrained(model, spec)
    body = {k for k in model.state_dict() if k.startswith("backbone.body.")}
    assert set(report.loaded) == body  # not one body tensor missing
    assert report.sha256 == hashlib.sha256(Path(report.file).read_bytes()).hexdigest()
    assert report.to_json()["sha256"] == report.sha256 and report.sha256[:12] in report.summary()
    unused = {k for k in state if k.startswith(head) or k.endswith("num_batches_tracked")}
    assert set(report.unused) == unused  # not one other tensor of the file unexplained
    assert all(k.startswith(head) for k, why in report.unused.items() if "head" in why)
    assert not any(k.startswith("backbone.body.") for k in report.reinitialised)
    own = model.state_dict()
    key = next(k for k in state if k.endswith("weight") and not k.startswith(head))
    mapped = "backbone.body." + key.removeprefix("features.")
    assert torch.equal(own[mapped], state[key])


CROP_NETS = [
    ("resnet18", tvm.resnet18, "ResNet18_Weights.IMAGENET1K_V1", "fc."),
    ("resnet50", tvm.resnet50, "ResNet50_Weights.IMAGENET1K_V2", "fc."),
    ("mobilenet_v3", tvm.mobilenet_v3_large, "MobileNet_V3_Large_Weights.IMAGENET1K_V1",
     "classifier."),
    ("vgg16", tvm.vgg16, "VGG16_Weights.IMAGENET1K_V1", "classifier."),
]  # fmt: skip


@pytest.mark.parametrize(("crop_net", "ctor", "name", "head"), CROP_NETS, ids=lambda v: str(v))
def test_imagenet_weights_fill_rcnns_crop_network(torch_home, crop_net, ctor, name, head):
    torch.manual_seed(0)
    state = ctor(weights=None).state_dict()
    spec = place(name, state)
    model = build_model("rcnn", 3, {"crop_net": crop_net, "norm": "auto", "pretrained": spec})
    report = load_pretrained(model, spec)
    body = "roi_heads.box_head.body."
    own = model.state_dict()
    assert set(report.loaded) == {k for k in own if k.startswith(body)}
    assert set(report.unused) == {
        k for k in state if k.startswith(head) or k.endswith("num_batches_tracked")
    }
    # Everything else is R-CNN's own: the crop FC and the class/box predictor.
    assert set(report.reinitialised) == {k for k in own if not k.startswith(body)}
    parts = {".".join(k.split(".")[:3]) for k in report.reinitialised}
    svm = {f"roi_heads.svm.{t}" for t in ("weight", "bias", "reg", "trained")}
    predictor = {"roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"}
    assert parts == {"roi_heads.box_head.fc"} | predictor | svm
    key = next(k for k in state if k.endswith("weight") and not k.startswith(head))
    assert torch.equal(own[body + key.removeprefix("features.")], state[key])
    # Fine-tuning leaves the stem frozen (as the FPN backbones' with pretrained weights).
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(body) for n in frozen)


def test_coco_detector_weights_reinitialise_only_the_class_predictor(torch_home):
    torch.manual_seed(0)
    state = tvm.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    spec = place("FasterRCNN_ResNet50_FPN_Weights.COCO_V1", state)
    model = build_model("faster_rcnn", 3, FASTERRCNN_RESNET50_FPN | {"pretrained": spec})
    report = load_pretrained(model, spec)
    assert sorted(report.reinitialised) == [
        "roi_heads.box_predictor.bbox_pred.bias",
        "roi_heads.box_predictor.bbox_pred.weight",
        "roi_heads.box_predictor.cls_score.bias",
        "roi_heads.box_predictor.cls_score.weight",
    ]
    assert (
        "3 outputs (the file has 91)"
        in report.reinitialised["roi_heads.box_predictor.cls_score.weight"]
    )
    assert all(k.endswith("num_batches_tracked") for k in report.unused)
    assert len(report.loaded) + len(report.reinitialised) == len(
        [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    )
    assert "4 re-initialised" in report.summary()


def test_faster_rcnn_weights_start_a_mask_rcnn_with_a_new_mask_branch(torch_home):
    torch.manual_seed(0)
    state = tvm.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    spec = place("FasterRCNN_ResNet50_FPN_Weights.COCO_V1", state)
    _, arch, _ = TORCHVISION_DETECTORS["maskrcnn_resnet50_fpn"]
    model = build_model("mask_rcnn", 91, arch | {"pretrained": spec})
    report = load_pretrained(model, spec)
    new = {k.split(".")[1] for k in report.reinitialised}
    assert new == {"mask_head", "mask_predictor"}
    assert all("not in the file" in why for why in report.reinitialised.values())


def test_another_architecture_is_an_error_naming_the_tensors(torch_home):
    small = build_model("faster_rcnn", 3, {"backbone": "small", "representation_size": 32})
    spec = place("FasterRCNN_ResNet50_FPN_Weights.COCO_V1", small.state_dict())
    model = build_model("faster_rcnn", 3, FASTERRCNN_RESNET50_FPN | {"pretrained": spec})
    with pytest.raises(
        WeightsError,
        match=r"59 tensor\(s\) do not fit this model.s layers: "
        r"backbone\.stages\.0\.0\.weight \(not in this model\)",
    ):
        load_pretrained(model, spec)


def test_classification_weights_do_not_fit_the_small_backbone(torch_home):
    spec = place("ResNet18_Weights.IMAGENET1K_V1", tvm.resnet18(weights=None).state_dict())
    model = build_model("faster_rcnn", 3, {"backbone": "small", "pretrained": spec})
    with pytest.raises(WeightsError, match="fit the backbones resnet18_fpn, resnet50_fpn"):
        load_pretrained(model, spec)


def test_offline_without_the_file_names_the_file_and_where(torch_home, monkeypatch):
    # A proxy that refuses connections: what an offline machine answers, at once.
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setattr(urllib.request, "_opener", None)  # re-read the proxy env; restored
    model = build_model("faster_rcnn", 3, FASTERRCNN_RESNET50_FPN)
    spec = "torchvision:FasterRCNN_ResNet50_FPN_Weights.COCO_V1"
    with pytest.raises(WeightsError) as err:
        load_pretrained(model, spec)
    text = str(err.value)
    assert "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth" in text
    assert f"place the file at {torch_home / 'fasterrcnn_resnet50_fpn_coco-258fb6c6.pth'}" in text
    assert not any(torch_home.iterdir())  # nothing half-downloaded left behind


@pytest.fixture
def weights_server(tmp_path, monkeypatch):
    """A real HTTP server on 127.0.0.1 serving ``served/``, standing in for
    download.pytorch.org: torchvision's name lookup is pointed at it (the only
    substitution; torch.hub downloads and checks as it would online). Yields the
    folder, the URL of a file in it and the paths the server was asked for."""
    import http.server
    import threading
    import types

    served, asked = tmp_path / "served", []
    served.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(served), **kw)

        def do_GET(self):  # noqa: N802 - http.server's name
            asked.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(urllib.request, "_opener", None)  # no proxy from the environment
    for var in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setattr(
        "torchvision.models.get_weight",
        lambda name: types.SimpleNamespace(url=f"{url}/{name}.pth", meta={}),
    )
    yield served, asked
    server.shutdown()
    server.server_close()


def _hashed_name(data: bytes) -> str:
    """A weights file name carrying its sha256 prefix, as torchvision's do."""
    return f"tiny-{hashlib.sha256(data).hexdigest()[:8]}"


def test_named_weights_are_downloaded_once_hash_checked_into_the_hub_cache(
    torch_home, weights_server, tmp_path
):
    from rcnnops.models.weights import read_state_dict, resolve

    served, asked = weights_server
    torch.save({"w": torch.arange(6.0)}, tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    name = _hashed_name(data)
    (served / f"{name}.pth").write_bytes(data)
    path = resolve(f"torchvision:{name}")
    assert path == torch_home / f"{name}.pth"
    assert path.read_bytes() == data
    assert torch.equal(read_state_dict(path)["w"], torch.arange(6.0))
    assert resolve(f"torchvision:{name}") == path  # from the cache: no second request
    assert asked == [f"/{name}.pth"]
    assert sorted(p.name for p in torch_home.iterdir()) == [f"{name}.pth"]


def test_a_download_with_other_bytes_is_refused_and_nothing_is_kept(torch_home, weights_server):
    from rcnnops.models.weights import resolve

    served, _ = weights_server
    name = _hashed_name(b"the real weights")
    (served / f"{name}.pth").write_bytes(b"<html>Please log in to the proxy</html>")
    with pytest.raises(WeightsError) as err:
        resolve(f"torchvision:{name}")
    text = str(err.value)
    assert "is not the file torchvision names" in text
    assert f'invalid hash value (expected "{name[-8:]}"' in text
    assert f"place it at {torch_home / (name + '.pth')}" in text
    assert not any(torch_home.iterdir())  # no file, no .partial


def test_unknown_weights_name_and_missing_file(torch_home, tmp_path):
    model = build_model("faster_rcnn", 3, {"backbone": "small"})
    with pytest.raises(WeightsError, match="not a torchvision weights name"):
        load_pretrained(model, "torchvision:NoSuch_Weights.V9")
    with pytest.raises(WeightsError, match="pretrained weights file not found"):
        load_pretrained(model, tmp_path / "nope.pth")


PREDICTOR_ROWS = [  # (tensor, rows per class)
    ("roi_heads.box_predictor.cls_score.weight", 1),
    ("roi_heads.box_predictor.cls_score.bias", 1),
    ("roi_heads.box_predictor.bbox_pred.weight", 4),
    ("roi_heads.box_predictor.bbox_pred.bias", 4),
    ("roi_heads.mask_predictor.mask_fcn_logits.weight", 1),
    ("roi_heads.mask_predictor.mask_fcn_logits.bias", 1),
]


def test_coco_weights_keep_the_rows_of_the_classes_they_share_by_name(torch_home, tmp_path):
    """Fine-tuning COCO weights on people, widgets and dogs: every class predictor
    (scores, box deltas, masks) starts with COCO's background, person and dog rows;
    the widget's rows are the builder's. A local file has no category list: its
    predictors are re-initialised whole."""
    torch.manual_seed(0)
    state = tvm.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    name = "MaskRCNN_ResNet50_FPN_Weights.COCO_V1"
    spec = place(name, state)
    coco = get_weight(name).meta["categories"]
    person, dog = coco.index("person"), coco.index("dog")
    _, arch, _ = TORCHVISION_DETECTORS["maskrcnn_resnet50_fpn"]
    model = build_model("mask_rcnn", 4, arch | {"pretrained": spec})
    fresh = {k: v.clone() for k, v in model.state_dict().items()}

    report = load_pretrained(model, spec, ["Person", "widget", "dog"])

    got = model.state_dict()
    for key, per in PREDICTOR_ROWS:

        def row(t, i, per=per):
            return t[i * per : (i + 1) * per]

        assert got[key].shape[0] == 4 * per
        assert torch.equal(row(got[key], 0), row(state[key], 0)), key  # background
        assert torch.equal(row(got[key], 1), row(state[key], person)), key
        assert torch.equal(row(got[key], 2), row(fresh[key], 2)), key  # widget: new
        assert torch.equal(row(got[key], 3), row(state[key], dog)), key
    assert sorted(report.by_name) == sorted(k for k, _ in PREDICTOR_ROWS)
    assert not report.reinitialised and set(report.by_name) <= set(report.loaded)
    assert report.by_name["roi_heads.box_predictor.cls_score.weight"] == (
        "2 of 3 classes from the file's (Person, dog); new, from the builder: widget"
    )
    assert "rows by class name: 2 of 3 classes" in report.summary()

    local = tmp_path / "coco.pt"
    torch.save(state, local)
    again = load_pretrained(build_model("mask_rcnn", 4, arch), local, ["person", "widget", "dog"])
    assert not again.by_name and sorted(again.reinitialised) == sorted(k for k, _ in PREDICTOR_ROWS)
