"""rcnnops' Faster / Mask R-CNN under the torchvision presets are torchvision's
detectors, layer for layer: the same weights (made here from torchvision's
constructor, random and seeded, placed in a temporary torch.hub cache under the
real COCO_V1 file name and loaded by that name) give the same detections on real
COCO photos at 800/1333. Random weights make the comparison strict: nothing can
hide behind a trained model's confidence.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torchvision.models import detection as tvd
from torchvision.models import get_weight
from torchvision.ops import FrozenBatchNorm2d

from rcnnops.data.io import load_image
from rcnnops.models import build_model
from rcnnops.models.weights import hub_dir, load_pretrained
from rcnnops.presets import TORCHVISION_DETECTORS
from tests.conftest import COCO_MINI

BUILDERS = {
    "fasterrcnn_resnet50_fpn": tvd.fasterrcnn_resnet50_fpn,
    "fasterrcnn_mobilenet_v3_large_fpn": tvd.fasterrcnn_mobilenet_v3_large_fpn,
    "maskrcnn_resnet50_fpn": tvd.maskrcnn_resnet50_fpn,
}
# Landscape and portrait COCO photos (640 px, resized to 800/1333): both for the
# cheap MobileNet, one each for the ResNet-50 pair (keeps make test within budget).
IMAGES = {
    "fasterrcnn_resnet50_fpn": ("000000000139.jpg",),
    "fasterrcnn_mobilenet_v3_large_fpn": ("000000000139.jpg", "000000000802.jpg"),
    "maskrcnn_resnet50_fpn": ("000000000802.jpg",),
}
# With random weights every class scores about 1/91, under torchvision's default
# 0.05; both models keep everything instead, so there are detections to compare.
KEEP_ALL = {"box_score_thresh": 0.0}

pytestmark = pytest.mark.skipif(not COCO_MINI.is_dir(), reason="needs ../shared/data/coco-mini")


def _frozen(model: nn.Module) -> nn.Module:
    """BatchNorm -> FrozenBatchNorm2d with the same statistics, as torchvision
    builds its detectors for pretrained weights (and as the COCO files were made)."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(model, name, frozen)
        else:
            _frozen(child)
    return model


@pytest.mark.parametrize("name", list(BUILDERS))
def test_torchvision_preset_is_torchvisions_detector(name, tmp_path, monkeypatch):
    images = [load_image(COCO_MINI / "val2017" / file) for file in IMAGES[name]]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    variant, arch, weights = TORCHVISION_DETECTORS[name]
    torch.manual_seed(0)
    reference = BUILDERS[name](weights=None, weights_backbone=None, **KEEP_ALL)
    # Random BatchNorm statistics, so frozen BN is not an identity that hides errors.
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    reference = _frozen(reference).eval()
    hub_dir().mkdir(parents=True)
    file = hub_dir() / os.path.basename(get_weight(weights.removeprefix("torchvision:")).url)
    torch.save(reference.state_dict(), file)

    ours = build_model(variant, 91, arch | {"pretrained": weights} | KEEP_ALL)
    report = load_pretrained(ours, weights)
    assert not report.reinitialised and not report.unused
    assert set(report.loaded) == set(ours.state_dict()) == set(reference.state_dict())
    ours.eval()
    with torch.no_grad():
        expected, got = reference(images), ours(images)
    for exp, out in zip(expected, got, strict=True):
        assert len(out["boxes"]) == len(exp["boxes"]) > 0
        assert torch.equal(out["labels"], exp["labels"])
        torch.testing.assert_close(out["boxes"], exp["boxes"], atol=0.01, rtol=0)
        torch.testing.assert_close(out["scores"], exp["scores"], atol=1e-5, rtol=0)
        if "masks" in exp:
            assert torch.equal(out["masks"] > 0.5, exp["masks"] > 0.5)
