"""The RoI stage shared by the variants: RoI pooling ops, the box head, the
papers' RoI sampling, and the box head's truncated SVD for inference.

RoI ops take ``(features, boxes, image_sizes)`` with ``boxes`` a list of
``[N_i, 4]`` xyxy in the (resized) image frame and return ``[sum N_i, C, S, S]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign, roi_pool


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
        # fp32 under autocast: box coordinates must not be rounded to 16 bits (and
        # torchvision's CPU kernel has no bf16); the box head casts back down.
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            return roi_pool(x.to(dtype), [b.to(dtype) for b in boxes], self.output_size, scale)


def _single_map_scale(x: torch.Tensor, image_sizes: list[tuple[int, int]]) -> float:
    """Feature-map scale from the padded batch width (the same for every image),
    rounded to a power of 2 as torchvision infers it."""
    scale = x.shape[-1] / max(s[1] for s in image_sizes)
    return 2.0 ** round(math.log2(scale))


ROI_OPS = ("align", "pool")


def roi_pooler(
    names: list[str], output_size: int, op: str = "align", sampling_ratio: int = 2
) -> nn.Module:
    """RoIAlign (bilinear, Mask R-CNN) or RoIPool (max, Fast/Faster R-CNN papers).

    RoIAlign (torchvision's op) picks the FPN level per box by its size; RoIPool
    needs a single map. An FPN's extra ``pool`` level feeds the RPN only (as in
    torchvision's detectors): RoIs are pooled from the other levels.
    """
    names = [n for n in names if n != "pool"]
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


def truncate_fc(layer: nn.Linear, rank: int) -> nn.Sequential:
    """``W ~ U_t S_t V_t^T``: one FC layer as two smaller ones (Fast R-CNN paper,
    section 3.1), on the layer's device and dtype.

    Cost drops from ``u * v`` to ``t * (u + v)`` multiply-adds per RoI. The top-``t``
    singular vectors come from the eigenvectors of the smaller Gram matrix
    (``W W^T`` or ``W^T W``, eigen-decomposed in float64): the same best rank-``t``
    approximation a full SVD gives, several times faster on a CPU (VGG16's fc6 is
    4096 x 25088).
    """
    weight = layer.weight.detach()
    w = weight.float()
    rank = min(rank, *w.shape)
    tall = w.shape[0] > w.shape[1]  # more outputs than inputs: the input side is smaller
    gram = w.T @ w if tall else w @ w.T
    _, vectors = torch.linalg.eigh(gram.double())  # eigenvalues ascending
    basis = vectors[:, -rank:].flip(1).to(w.dtype)  # the top-rank singular vectors
    if tall:  # basis = V_t:  W ~ (W V_t) V_t^T
        first_weight, second_weight = basis.T, w @ basis
    else:  # basis = U_t:  W ~ U_t (U_t^T W) = U_t (S_t V_t^T)
        first_weight, second_weight = basis.T @ w, basis
    like = {"device": weight.device, "dtype": weight.dtype}
    first = nn.Linear(layer.in_features, rank, bias=False, **like)
    second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None, **like)
    with torch.no_grad():
        first.weight.copy_(first_weight)
        second.weight.copy_(second_weight)
        if layer.bias is not None:
            second.bias.copy_(layer.bias)
    return nn.Sequential(first, second)


def compress(model: nn.Module, rank: int | Sequence[int]) -> nn.Module:
    """Replace each FC layer of the box head with its rank-``rank`` truncated SVD
    (:func:`truncate_fc`), in place; for inference, once weights are loaded.
    ``rank``: one for every layer, or one per FC layer in order (the paper's
    VGG16: fc6 1024, fc7 256).

    The FC layers are the ``nn.Linear`` children of ``model.roi_heads.box_head``:
    fc6 and fc7 of ``mlp``, both FCs of ``mlp_bn``, the last FC of ``conv``
    (fast_rcnn, faster_rcnn and mask_rcnn alike). A box head with none (R-CNN's
    per-crop CNN, or a head compressed already) raises ``ValueError``.
    """
    head = model.roi_heads.box_head
    fcs = [(name, m) for name, m in head.named_children() if isinstance(m, nn.Linear)]
    if not fcs:
        raise ValueError(
            f"{type(model).__name__}'s box head ({type(head).__name__}) has no FC layer "
            "to compress by truncated SVD"
        )
    ranks = [rank] * len(fcs) if isinstance(rank, int) else list(rank)
    if len(ranks) != len(fcs):
        raise ValueError(
            f"{len(ranks)} SVD ranks for the {len(fcs)} FC layers of the box head "
            f"({', '.join(name for name, _ in fcs)})"
        )
    for (name, module), r in zip(fcs, ranks, strict=True):
        setattr(head, name, truncate_fc(module, r))
    return model
