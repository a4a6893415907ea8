"""Backbones and the image transform in front of them.

Backbones return feature maps as an ``OrderedDict[str, Tensor[B, C, H/s, W/s]]``
and expose ``out_channels`` (torchvision's detection convention). Never
downloads: pretrained weights come from a local file (``weights.load_pretrained``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn
from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d

BACKBONES = ("small", "resnet18_fpn", "resnet50_fpn", "mobilenet_v3_fpn", "vgg16")
# Whole-image classification bodies (R-CNN's per-crop network): ImageNet weights load as is.
CLASSIFICATION_BODIES = ("resnet18", "resnet50", "mobilenet_v3", "vgg16")
NORMS = ("auto", "batch", "group", "frozen")

# ImageNet statistics: right for pretrained backbones, harmless from scratch.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def norm_layer(norm: str, pretrained: bool) -> Callable[[int], nn.Module]:
    """The normalisation for a backbone.

    ``auto`` freezes BatchNorm when fine-tuning pretrained weights (as
    torchvision does) and trains it from scratch, where frozen statistics
    would leave the network unnormalised.
    """
    if norm == "auto":
        norm = "frozen" if pretrained else "batch"
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "frozen":
        return FrozenBatchNorm2d
    if norm == "group":
        return lambda c: nn.GroupNorm(min(32, c // 4), c)
    raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")


class SmallBackbone(nn.Module):
    """A small CNN that learns from scratch in minutes on a CPU.

    Four stages (strides 2, 4, 8, 16) of two 3x3 conv-norm-ReLU layers; the
    stride-16 stage (cheap on its small map) gives context and a receptive
    field larger than the objects, and a top-down step as in an FPN brings it
    back to the output stride. Input ``[B, 3, H, W]``; output
    ``{"0": [B, out_channels, H/s, W/s]}`` with ``s = stride`` (8, or 4 for
    finer localisation of small objects at about twice the cost).
    """

    def __init__(
        self, width: int = 32, out_channels: int = 128, stride: int = 8, norm=nn.BatchNorm2d
    ) -> None:
        super().__init__()
        if stride not in (4, 8):
            raise ValueError(f"SmallBackbone stride must be 4 or 8, got {stride}")

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, 2, 1, bias=False),
                norm(cout),
                nn.ReLU(True),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                norm(cout),
                nn.ReLU(True),
            )

        w = width
        self.stages = nn.ModuleList(
            [stage(3, w), stage(w, 2 * w), stage(2 * w, 4 * w), stage(4 * w, 8 * w)]
        )
        # Lateral 1x1 convs for the stride-16 map and each map down to the output stride.
        keep = [2, 3] if stride == 8 else [1, 2, 3]
        self.keep = keep
        self.lateral = nn.ModuleDict({str(i): nn.Conv2d(w * 2**i, out_channels, 1) for i in keep})
        self.smooth = nn.Sequential(
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False),
            norm(out_channels),
            nn.ReLU(True),
        )
        self.out_channels = out_channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # Written so torch.jit.script compiles it (rcnnops export --format torchscript):
        # the lateral convs by iteration (their keys are the stage indices, ascending).
        feats: list[torch.Tensor] = []
        for s in self.stages:
            x = s(x)
            feats.append(x)
        laterals: list[torch.Tensor] = []
        for key, conv in self.lateral.items():
            laterals.append(conv(feats[int(key)]))
        top = laterals[-1]
        for i in range(len(laterals) - 2, -1, -1):
            lat = laterals[i]
            top = lat + nn.functional.interpolate(top, size=lat.shape[-2:], mode="nearest")
        return OrderedDict([("0", self.smooth(top))])


def build_backbone(
    name: str, norm: str = "auto", pretrained: bool = False, stride: int = 8
) -> nn.Module:
    """A backbone by name; never downloads (weights come from a local file later).

    ``stride`` applies to ``small`` only (FPN backbones have all strides)."""
    layer = norm_layer(norm, pretrained)
    if name == "small":
        return SmallBackbone(stride=stride, norm=layer)
    # Train every stage from scratch; with pretrained weights freeze the stem.
    if name in ("resnet18_fpn", "resnet50_fpn"):
        return resnet_fpn_backbone(
            backbone_name=name.removesuffix("_fpn"),
            weights=None,
            norm_layer=layer,
            trainable_layers=3 if pretrained else 5,
        )
    if name == "mobilenet_v3_fpn":
        return mobilenet_backbone(
            backbone_name="mobilenet_v3_large",
            weights=None,
            fpn=True,
            norm_layer=layer,
            trainable_layers=3 if pretrained else 6,
        )
    if name == "vgg16":
        return VGG16Backbone(frozen_layers=10 if pretrained else 0)
    raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")


VGG16_CONFIG = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)


def vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` (same modules, indices and init) without
    building its 120 M-parameter classifier: conv1_1 .. pool5, stride 32."""
    layers: list[nn.Module] = []
    cin = 3
    for v in VGG16_CONFIG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        conv = nn.Conv2d(cin, v, kernel_size=3, padding=1)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.ReLU(inplace=True)]
        cin = v
    return nn.Sequential(*layers)


class VGG16Backbone(nn.Module):
    """The Fast/Faster R-CNN papers' VGG16: torchvision's ``vgg16().features`` up to
    conv5_3 (its last max-pool dropped), one map at stride 16 with 512 channels.

    Its tensors are ``body.N`` for torchvision's ``features.N``, so ImageNet
    weights load without a mapping. ``frozen_layers``: the first ``features``
    modules kept fixed (the papers fine-tune from conv3_1, i.e. 10 with ImageNet
    weights). VGG16 has no normalisation layers, so ``norm`` does not apply.
    """

    out_channels = 512

    def __init__(self, frozen_layers: int = 0) -> None:
        super().__init__()
        self.body = vgg16_features()[:-1]
        for layer in list(self.body)[:frozen_layers]:
            layer.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return OrderedDict([("0", self.body(x))])


def classification_body(name: str, norm: str = "auto", pretrained: bool = False) -> nn.Module:
    """torchvision's ImageNet classification network ``name`` without its head:
    ``[B, 3, H, W] -> [B, C, H/32, W/32]``, with ``out_channels = C``.

    Its tensor names are the classification network's (``conv1``, ``layer1.0...``
    for ResNets; ``features.N`` without ``features.`` for MobileNetV3), so its
    ImageNet weights load without a mapping (:mod:`rcnnops.models.weights`). With
    pretrained weights the stem is frozen, as the FPN backbones freeze theirs.
    """
    from torchvision import models as tvm

    layer = norm_layer(norm, pretrained)
    if name in ("resnet18", "resnet50"):
        net = getattr(tvm, name)(weights=None, norm_layer=layer)
        stages = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        body = nn.Sequential(OrderedDict((s, getattr(net, s)) for s in stages))
        frozen = ["conv1", "bn1", "layer1"]
        body.out_channels = net.fc.in_features
    elif name == "vgg16":  # the R-CNN paper's network: conv1_1 .. pool5 (no norm layers)
        body = vgg16_features()
        frozen = [str(i) for i in range(10)]  # up to conv3_1, as the papers fine-tune
        body.out_channels = 512
    elif name == "mobilenet_v3":
        net = tvm.mobilenet_v3_large(weights=None, norm_layer=layer)
        body = net.features
        # Freeze up to the third-last stage (torchvision's trainable_layers=3).
        cn = [i for i, b in enumerate(body) if getattr(b, "_is_cn", False)]
        starts = [0, *cn, len(body) - 1]
        frozen = [str(i) for i in range(starts[len(starts) - 3])]
        body.out_channels = body[-1].out_channels
    else:
        raise ValueError(
            f"unknown crop_net {name!r}; choose small or one of {CLASSIFICATION_BODIES}"
        )
    if pretrained:
        for part in frozen:
            getattr(body, part).requires_grad_(False)
    return body


def feature_names(backbone: nn.Module, image_size: int = 64) -> list[str]:
    """Names of the feature maps a backbone returns (probed on a tiny input)."""
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        names = list(backbone(torch.zeros(1, 3, image_size, image_size)).keys())
    backbone.train(was_training)
    return names


def image_transform(min_size: int, max_size: int) -> GeneralizedRCNNTransform:
    """Resize (shorter side ``min_size``, longer <= ``max_size``) and normalise."""
    return GeneralizedRCNNTransform(min_size, max_size, list(IMAGE_MEAN), list(IMAGE_STD))
