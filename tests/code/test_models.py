"""The variants' losses and outputs on tiny images (one without objects)."""

import pickle

import pytest
import torch

from rcnnops.models import MASK_VARIANTS, MODELS, USES_PROPOSALS, build_model
from rcnnops.models.weights import load_pretrained

SMALL = {
    "backbone": "small",
    "min_size": 64,
    "max_size": 64,
    "anchor_sizes": [16, 32],
    "representation_size": 32,
    "box_batch_size_per_image": 16,
}


def _batch(masks: bool = False):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g), torch.rand(3, 48, 64, generator=g)]
    targets = [
        {
            "boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [30.0, 30.0, 60.0, 60.0]]),
            "labels": torch.tensor([1, 2]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # no objects
    ]
    if masks:
        m = torch.zeros(2, 64, 64, dtype=torch.uint8)
        m[0, 6:40, 4:30] = 1
        m[1, 30:60, 30:60] = 1
        targets[0]["masks"] = m
        targets[1]["masks"] = torch.zeros(0, 48, 64, dtype=torch.uint8)
    return images, targets


CASES = {
    "faster_rcnn": [
        {"roi_op": "pool"},
        {"roi_op": "align", "stride": 4},
        {"box_head": "conv", "norm": "group"},
    ],
    "fast_rcnn": [{"roi_op": "pool"}, {"roi_op": "align", "box_head": "mlp_bn", "stride": 4}],
    "rcnn": [
        {"warp_size": 24, "context": 2, "width": 8},
        {"warp_size": 32, "context": 2, "crop_net": "resnet18", "norm": "frozen"},
    ],
    "mask_rcnn": [
        {"mask_head_channels": 16, "mask_head_layers": 2, "stride": 4},
        {"mask_head_channels": 8, "mask_head_layers": 1, "roi_op": "pool", "mask_roi_op": "pool"},
    ],
}
PROPOSAL_SMALL = {
    "min_size": 64,
    "max_size": 64,
    "representation_size": 32,
    "box_batch_size_per_image": 16,
}


def _props():
    # Image 0: boxes near the objects; image 1 (no objects): none at all.
    return [
        torch.tensor(
            [
                [5.0, 5.0, 30.0, 38.0],
                [28.0, 31.0, 61.0, 60.0],
                [0.0, 0.0, 20.0, 20.0],
                [40.0, 0.0, 64.0, 20.0],
            ]
        ),
        torch.zeros(0, 4),
    ]


@pytest.mark.parametrize(("variant", "options"), [(v, o) for v in sorted(CASES) for o in CASES[v]])
def test_losses_and_outputs(variant, options):
    assert set(CASES) == set(MODELS)
    torch.manual_seed(0)
    uses_props = variant in USES_PROPOSALS
    base = PROPOSAL_SMALL if uses_props else SMALL
    model = build_model(variant, 3, base | options)
    has_masks = variant in MASK_VARIANTS
    images, targets = _batch(masks=has_masks)
    props = _props() if uses_props else None
    model.train()
    losses = model(images, targets, props) if uses_props else model(images, targets)
    expected = {"loss_classifier", "loss_box_reg"}
    if not uses_props:
        expected |= {"loss_objectness", "loss_rpn_box_reg"}
    if has_masks:
        expected |= {"loss_mask"}
    assert set(losses) == expected
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.eval()
    with torch.no_grad():
        out = model(images, proposals=props) if uses_props else model(images)
    assert len(out) == 2
    if uses_props:
        assert len(out[1]["boxes"]) == 0  # no proposal, no detection
    for o, im in zip(out, images, strict=True):
        n = len(o["boxes"])
        assert o["boxes"].shape == (n, 4) and o["labels"].shape == (n,)
        assert o["scores"].shape == (n,)
        assert o["boxes"].dtype == torch.float32 and o["labels"].dtype == torch.int64
        if has_masks:  # per detection, pasted back at the input image's resolution
            assert o["masks"].shape == (n, 1, *im.shape[1:])
            assert ((o["masks"] >= 0) & (o["masks"] <= 1)).all()
        if n:
            h, w = im.shape[1:]
            assert (o["boxes"][:, 0] >= 0).all() and (o["boxes"][:, 2] <= w).all()
            assert (o["boxes"][:, 3] <= h).all() and (o["labels"] >= 1).all()
            assert (o["labels"] <= 2).all()


@pytest.mark.parametrize("variant", sorted(USES_PROPOSALS))
def test_proposal_variants_require_proposals(variant):
    model = build_model(variant, 3, PROPOSAL_SMALL | CASES[variant][0]).eval()
    with pytest.raises(ValueError, match="needs precomputed proposals"):
        model([torch.rand(3, 64, 64)])


@pytest.mark.parametrize("variant", ["faster_rcnn", "mask_rcnn"])
def test_rpn_variants_reject_proposals(variant):
    model = build_model(variant, 3, SMALL).eval()
    with pytest.raises(ValueError, match="own proposals"):
        model([torch.rand(3, 64, 64)], proposals=[torch.zeros(1, 4)])


def test_mask_rcnn_is_faster_rcnn_plus_a_mask_branch():
    """The paper's layout: RoIAlign 7x7 for boxes and 14x14 for masks, a per-class
    28x28 mask predictor; with no object in an image the mask loss is zero."""
    from torchvision.ops import MultiScaleRoIAlign

    model = build_model("mask_rcnn", 4, SMALL | {"mask_head_channels": 16})
    heads = model.roi_heads
    assert isinstance(heads.box_roi_pool, MultiScaleRoIAlign)
    assert heads.box_roi_pool.output_size == (7, 7)
    assert heads.mask_roi_pool.output_size == (14, 14)
    assert heads.mask_predictor.mask_fcn_logits.out_channels == 4  # one mask per class
    x = torch.rand(2, model.backbone.out_channels, 14, 14)
    assert heads.mask_predictor(heads.mask_head(x)).shape == (2, 4, 28, 28)
    images, targets = _batch(masks=True)
    model.train()
    losses = model(images[1:], targets[1:])  # the image without objects
    assert losses["loss_mask"].item() == 0.0 and torch.isfinite(losses["loss_classifier"])


@pytest.mark.parametrize("backbone", ["resnet18_fpn", "mobilenet_v3_fpn"])
def test_gpu_backbones_build_and_run_on_cpu(backbone):
    model = build_model("faster_rcnn", 3, {"backbone": backbone, "min_size": 64, "max_size": 64})
    bn = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn, "from scratch, BatchNorm must be trainable (not FrozenBatchNorm2d)"
    model.eval()
    with torch.no_grad():
        assert len(model([torch.rand(3, 64, 64)])) == 1


def test_params_know_each_variants_model_keys():
    """params check ``train.<variant>.model`` keys when they load (a typo stopped
    only at its training, after the data stages) from a list of their own: it must
    be the builders' parameters."""
    from rcnnops.models import MODELS, model_keys
    from rcnnops.params_rules import MODEL_KEYS

    for variant, keys in MODEL_KEYS.items():
        assert keys == model_keys(variant), variant
    assert set(MODEL_KEYS) == set(MODELS)


def test_unknown_model_param_is_named():
    with pytest.raises(ValueError, match=r"train.faster_rcnn.model: unknown key\(s\) \['depth'\]"):
        build_model("faster_rcnn", 3, {"depth": 3})


def test_pretrained_weights_from_local_file(tmp_path):
    torch.manual_seed(1)
    src = build_model("faster_rcnn", 5, SMALL)  # another class count
    path = tmp_path / "weights.pt"
    torch.save(src.state_dict(), path)
    torch.manual_seed(2)
    model = build_model("faster_rcnn", 3, SMALL | {"pretrained": str(path)})
    report = load_pretrained(model, path)
    key = "backbone.stages.0.0.weight"
    assert torch.equal(model.state_dict()[key], src.state_dict()[key])
    assert sorted(report.reinitialised) == [
        f"roi_heads.box_predictor.{layer}.{p}"
        for layer in ("bbox_pred", "cls_score")
        for p in ("bias", "weight")
    ]
    # pretrained -> norm auto freezes BatchNorm
    assert not [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]


class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pretrained_pickle_payload_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"x": _Payload()}, f)
    model = build_model("faster_rcnn", 3, SMALL)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_pretrained(model, path)


def test_svd_rank_is_applied_when_a_model_is_loaded(tmp_path, capsys):
    """``evaluate.svd_rank`` compresses the loaded model's box-head FC layers (the
    trained files are untouched: no retraining); R-CNN, without FC layers in its
    per-crop head, is loaded whole with a note."""
    from rcnnops.data.dataset import LabelMap
    from rcnnops.models.io import load_model, save_model

    labels = LabelMap((1, 2), ("a", "b")).to_json()
    params = SMALL | {"box_head": "mlp", "representation_size": 32}
    model = build_model("faster_rcnn", 3, params)
    save_model(model, tmp_path / "f", {"variant": "faster_rcnn", "num_classes": 3,
                                        "model_params": params, "labels": labels})  # fmt: skip
    before = (tmp_path / "f" / "model.pt").read_bytes()
    loaded, _ = load_model(tmp_path / "f", svd_rank=4)
    for fc in (loaded.roi_heads.box_head.fc6, loaded.roi_heads.box_head.fc7):
        first, second = fc
        assert torch.linalg.matrix_rank(second.weight @ first.weight) <= 4
    assert (tmp_path / "f" / "model.pt").read_bytes() == before
    whole, _ = load_model(tmp_path / "f")
    assert isinstance(whole.roi_heads.box_head.fc6, torch.nn.Linear)

    rcnn_params = {"warp_size": 16, "context": 1, "width": 8, "representation_size": 16}
    rcnn = build_model("rcnn", 3, rcnn_params)
    save_model(rcnn, tmp_path / "r", {"variant": "rcnn", "num_classes": 3,
                                       "model_params": rcnn_params, "labels": labels})  # fmt: skip
    load_model(tmp_path / "r", svd_rank=4)
    assert "rcnn runs uncompressed" in capsys.readouterr().err


def test_a_variant_module_is_imported_when_the_variant_is_built():
    """A stage for one variant loads only that variant's module (and the one it
    builds on); the flow's warm-up loads none, nor torch (the flow's process never
    loads a model). In a fresh interpreter: this process has imported them all."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from rcnnops import registry\n"
        "registry.warm_up()\n"
        "from rcnnops.models import MODELS, build_model\n"
        "def variants(): return sorted(m.rsplit('.', 1)[1] for m in sys.modules\n"
        "    if m in {'rcnnops.models.' + v for v in MODELS})\n"
        "print('torch' in sys.modules, variants(), 'mask_rcnn' in MODELS, 'yolo' in MODELS)\n"
        "build_model('mask_rcnn', 3, {})\n"
        "print(variants())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [
        "False [] True False",
        "['faster_rcnn', 'mask_rcnn']",
    ]
