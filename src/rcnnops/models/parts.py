"""Parts shared by every variant: backbones, normalisation, anchors, RoI heads.

Backbones return feature maps as an ``OrderedDict[str, Tensor[B, C, H/s, W/s]]``
and expose ``out_channels`` (torchvision's detection convention). A variant
module composes these parts and holds only its own difference.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign, roi_pool

BACKBONES = ("small", "resnet18_fpn", "resnet50_fpn", "mobilenet_v3_fpn")
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

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = []
        for s in self.stages:
            x = s(x)
            feats.append(x)
        top = self.lateral[str(self.keep[-1])](feats[self.keep[-1]])
        for i in reversed(self.keep[:-1]):
            lat = self.lateral[str(i)](feats[i])
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
    raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")


def feature_names(backbone: nn.Module, image_size: int = 64) -> list[str]:
    """Names of the feature maps a backbone returns (probed on a tiny input)."""
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        names = list(backbone(torch.zeros(1, 3, image_size, image_size)).keys())
    backbone.train(was_training)
    return names


def anchor_generator(
    names: list[str], sizes: list[int] | None, aspect_ratios: list[float]
) -> AnchorGenerator:
    """One anchor size per FPN level, or all sizes on a single feature map."""
    ratios = tuple(aspect_ratios)
    if len(names) == 1:
        return AnchorGenerator((tuple(sizes or [16, 32, 64]),), (ratios,))
    sizes = sizes or [32 * 2**i for i in range(len(names))]
    if len(sizes) != len(names):
        raise ValueError(f"anchor_sizes needs one size per feature map ({len(names)}), got {sizes}")
    return AnchorGenerator(tuple((s,) for s in sizes), (ratios,) * len(names))


class RoIPool(MultiScaleRoIAlign):
    """RoI max pooling (Fast R-CNN's quantised op) over a single feature map.

    Same call as ``MultiScaleRoIAlign``: ``(features, boxes, image_sizes)`` with
    ``boxes`` a list of ``[N_i, 4]`` xyxy in the (resized) image frame; returns
    ``[sum N_i, C, S, S]``. Chosen on CPUs because torchvision's CPU
    ``roi_align`` backward is about 8x slower than ``roi_pool``'s. (A subclass
    of ``MultiScaleRoIAlign`` only because torchvision's heads type-check it.)
    """

    def __init__(self, featmap_name: str, output_size: int) -> None:
        super().__init__([featmap_name], output_size, sampling_ratio=0)
        self.featmap_name = featmap_name

    def forward(self, features, boxes, image_sizes):
        x = features[self.featmap_name]
        scale = _single_map_scale(x, image_sizes)
        return roi_pool(x, [b.to(x.dtype) for b in boxes], self.output_size, scale)


def _single_map_scale(x: torch.Tensor, image_sizes: list[tuple[int, int]]) -> float:
    """Feature-map scale from the padded batch width (the same for every image),
    rounded to a power of 2 as torchvision infers it."""
    scale = x.shape[-1] / max(s[1] for s in image_sizes)
    return 2.0 ** round(math.log2(scale))


def roi_align_sampled(
    x: torch.Tensor,
    boxes: list[torch.Tensor],
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
) -> torch.Tensor:
    """RoIAlign with torchvision's semantics (``aligned=False``, a fixed
    ``sampling_ratio`` >= 1) computed with ``grid_sample``.

    Each output bin averages ``sampling_ratio**2`` bilinear samples at regular
    points inside it (no quantisation); coordinates within one pixel outside
    the map read the border, farther ones read 0, as in torchvision's kernel.
    The result equals ``torchvision.ops.roi_align`` to float rounding, but the
    backward pass is a vectorised ``grid_sample`` backward instead of a
    single-threaded scatter: about 2x faster forward + backward on a CPU.
    ``boxes``: one ``[R_i, 4]`` xyxy tensor per image; returns ``[sum R_i, C, *output_size]``.
    """
    n, c, h, w = x.shape
    ph, pw = output_size
    sr = sampling_ratio
    out = []
    for i, b in enumerate(boxes):
        r = len(b)
        if r == 0:
            out.append(x.new_zeros((0, c, ph, pw)))
            continue
        b = b.to(x.dtype) * spatial_scale
        bw = (b[:, 2] - b[:, 0]).clamp(min=1.0)
        bh = (b[:, 3] - b[:, 1]).clamp(min=1.0)
        tx = (torch.arange(pw * sr, device=x.device, dtype=x.dtype) + 0.5) / (pw * sr)
        ty = (torch.arange(ph * sr, device=x.device, dtype=x.dtype) + 0.5) / (ph * sr)
        xs = b[:, 0:1] + tx[None] * bw[:, None]  # [r, pw * sr] sample x, feature pixels
        ys = b[:, 1:2] + ty[None] * bh[:, None]
        gx = xs * (2.0 / max(w - 1, 1)) - 1.0  # align_corners=True: pixel k at -1 + 2k/(w-1)
        gy = ys * (2.0 / max(h - 1, 1)) - 1.0
        size = (r, ph * sr, pw * sr)
        grid = torch.stack((gx[:, None, :].expand(size), gy[:, :, None].expand(size)), dim=-1)
        grid = grid.reshape(1, r * ph * sr, pw * sr, 2)
        o = F.grid_sample(x[i : i + 1], grid, "bilinear", "border", align_corners=True)
        o = o.view(c, r, ph * sr, pw * sr).transpose(0, 1)
        inside_y = ((ys >= -1.0) & (ys <= h)).to(o.dtype)
        inside_x = ((xs >= -1.0) & (xs <= w)).to(o.dtype)
        o = o * (inside_y[:, None, :, None] * inside_x[:, None, None, :])
        out.append(F.avg_pool2d(o, sr) if sr > 1 else o)
    return torch.cat(out)


class RoIAlign(MultiScaleRoIAlign):
    """RoIAlign over a single feature map (:func:`roi_align_sampled`); same call
    and output as ``MultiScaleRoIAlign``, of which it is a subclass because
    torchvision's heads type-check it."""

    def __init__(self, featmap_name: str, output_size: int, sampling_ratio: int) -> None:
        if sampling_ratio < 1:
            raise ValueError(f"sampling_ratio must be >= 1 here, got {sampling_ratio}")
        super().__init__([featmap_name], output_size, sampling_ratio=sampling_ratio)
        self.featmap_name = featmap_name

    def forward(self, features, boxes, image_sizes):
        x = features[self.featmap_name]
        return roi_align_sampled(
            x, boxes, self.output_size, _single_map_scale(x, image_sizes), self.sampling_ratio
        )


ROI_OPS = ("align", "pool")


def roi_pooler(
    names: list[str], output_size: int, op: str = "align", sampling_ratio: int = 2
) -> nn.Module:
    """RoIAlign (bilinear, Mask R-CNN) or RoIPool (max, Fast/Faster R-CNN papers).

    RoIAlign picks the FPN level per box by its size; RoIPool needs a single map.
    On a single map (the small backbone) RoIAlign is :class:`RoIAlign`, torchvision's
    op computed faster on CPUs.
    """
    if op == "align" and len(names) == 1 and sampling_ratio >= 1:
        return RoIAlign(names[0], output_size, sampling_ratio)
    if op == "align":
        return MultiScaleRoIAlign(
            featmap_names=names, output_size=output_size, sampling_ratio=sampling_ratio
        )
    if op == "pool":
        if len(names) != 1:
            raise ValueError(
                "roi_op 'pool' needs a single-map backbone (small); "
                "use roi_op 'align' with FPN backbones"
            )
        return RoIPool(names[0], output_size)
    raise ValueError(f"unknown roi_op {op!r}; choose one of {ROI_OPS}")


def load_pretrained(model: nn.Module, path: str | Path) -> dict[str, int]:
    """Load weights from a local file into ``model`` (or its backbone body).

    Accepts a full detector state dict (e.g. a COCO-trained torchvision model:
    tensors whose shapes differ, like the class predictor, are skipped) or a
    classification backbone's (e.g. ImageNet ResNet weights, loaded into
    ``backbone.body``). Loads with ``weights_only=True``: a pickle with code in
    it is refused. Returns counts of loaded and skipped tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pretrained weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for bad files
        raise ValueError(f"{path}: not a loadable weights file (weights_only=True): {e}") from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    own = model.state_dict()
    prefix = "" if any(k in own for k in state) else "backbone.body."
    matched = {
        prefix + k: v
        for k, v in state.items()
        if prefix + k in own and own[prefix + k].shape == v.shape
    }
    if not matched:
        raise ValueError(f"{path}: no tensor matches this model's layers; wrong file?")
    model.load_state_dict(matched, strict=False)
    return {"loaded": len(matched), "skipped": len(state) - len(matched)}


def box_head(
    kind: str, channels: int, pool: int, representation: int, norm: Callable[[int], nn.Module]
) -> nn.Module:
    """The RoI box head ``[R, C, pool, pool] -> [R, representation]``.

    ``mlp``: two FC layers (the papers'); ``mlp_bn``: the same with BatchNorm
    after each FC, which learns far faster from scratch at almost no cost;
    ``conv``: four normalised 3x3 convs + one FC (detectron2's scratch head;
    slow on CPUs)."""
    if kind == "mlp":
        return TwoMLPHead(channels * pool * pool, representation)
    if kind == "mlp_bn":
        return nn.Sequential(
            nn.Flatten(1),
            nn.Linear(channels * pool * pool, representation, bias=False),
            nn.BatchNorm1d(representation),
            nn.ReLU(inplace=True),
            nn.Linear(representation, representation, bias=False),
            nn.BatchNorm1d(representation),
            nn.ReLU(inplace=True),
        )
    if kind == "conv":
        return FastRCNNConvFCHead(
            (channels, pool, pool), [channels] * 4, [representation], norm_layer=norm
        )
    raise ValueError(f"unknown box_head {kind!r}; choose 'mlp', 'mlp_bn' or 'conv'")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class PrecomputedProposals(nn.Module):
    """The precomputed-proposal source (selective search) behind the same call
    an RPN answers: boxes given in the stored image's frame are rescaled with
    the image (as Detectron2's precomputed-proposal mode does), clipped, cleaned
    of degenerate boxes and capped at ``top_n`` per image (train / test).

    ``forward(proposals: list[Tensor[N_i, 4]], original_sizes, image_sizes)``
    -> ``list[Tensor[M_i, 4]]`` xyxy in the transformed image's frame.
    """

    def __init__(
        self, top_n_train: int = 2000, top_n_test: int = 2000, min_size: float = 1.0
    ) -> None:
        super().__init__()
        self.top_n = {"train": top_n_train, "test": top_n_test}
        self.min_size = min_size

    def forward(self, proposals, original_sizes, image_sizes):
        from torchvision.ops import boxes as box_ops

        if proposals is None or len(proposals) != len(image_sizes):
            raise ValueError(
                "this variant needs precomputed proposals: one Tensor[N_i, 4] "
                "per image (run the `proposals` stage)"
            )
        n = self.top_n["train" if self.training else "test"]
        out = []
        for boxes, (oh, ow), (h, w) in zip(proposals, original_sizes, image_sizes, strict=True):
            boxes = boxes[:n].to(torch.float32)
            scale = boxes.new_tensor([w / ow, h / oh, w / ow, h / oh])
            boxes = box_ops.clip_boxes_to_image(boxes * scale, (h, w))
            out.append(boxes[box_ops.remove_small_boxes(boxes, self.min_size)])
        return out


class ProposalRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` with the Fast R-CNN / R-CNN paper's sampling:
    foreground IoU >= ``fg_iou``, background IoU in ``[bg_iou_low, fg_iou)``;
    proposals overlapping every object by less than ``bg_iou_low`` are ignored
    (a form of hard-example selection in the papers)."""

    def __init__(self, *args, bg_iou_low: float = 0.1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bg_iou_low = bg_iou_low

    def assign_targets_to_proposals(self, proposals, gt_boxes, gt_labels):
        matched_idxs, labels = super().assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
        if self.bg_iou_low > 0:
            from torchvision.ops import box_iou

            for props, gts, lab in zip(proposals, gt_boxes, labels, strict=True):
                if gts.numel() == 0:
                    continue  # an image with no object: every proposal is background
                best = box_iou(gts, props).amax(dim=0)
                lab[(best < self.bg_iou_low) & (lab == 0)] = -1
        return matched_idxs, labels


def proposal_sampling(
    fg_iou: float,
    bg_iou_low: float,
    batch_size_per_image: int,
    positive_fraction: float,
    score_thresh: float,
    nms_thresh: float,
    detections_per_img: int,
) -> dict:
    """:class:`ProposalRoIHeads` keyword arguments: the papers' RoI sampling
    (fg IoU >= ``fg_iou``, bg in ``[bg_iou_low, fg_iou)``) and test-time NMS."""
    return {
        "fg_iou_thresh": fg_iou,
        "bg_iou_thresh": fg_iou,
        "batch_size_per_image": batch_size_per_image,
        "positive_fraction": positive_fraction,
        "bbox_reg_weights": None,
        "score_thresh": score_thresh,
        "nms_thresh": nms_thresh,
        "detections_per_img": detections_per_img,
        "bg_iou_low": bg_iou_low,
    }


def image_transform(min_size: int, max_size: int) -> GeneralizedRCNNTransform:
    """Resize (shorter side ``min_size``, longer <= ``max_size``) and normalise."""
    return GeneralizedRCNNTransform(min_size, max_size, list(IMAGE_MEAN), list(IMAGE_STD))
