"""The proposal sources behind the RoI heads: precomputed (selective search)
boxes for R-CNN and Fast R-CNN, and the anchors of the RPN that Faster and
Mask R-CNN learn.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator


class Fp32Anchors(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` with anchors always in fp32.

    torchvision makes anchors in the feature maps' dtype, so under bf16 autocast
    an anchor at x = 100 px would start 0.5 px off, and the RPN's box targets with
    it. Only the maps' shapes and device are read, so they are passed as fp32
    views of one zero (no copy)."""

    def forward(self, image_list, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        shapes = [torch.zeros((), device=f.device).expand(f.shape) for f in feature_maps]
        return super().forward(image_list, shapes)


def anchor_generator(
    names: list[str], sizes: list[int] | list[list[int]] | None, aspect_ratios: list[float]
) -> AnchorGenerator:
    """The RPN's anchors: on a single feature map all ``sizes`` there; on an FPN one
    size per level (default 32, 64, ... as torchvision), or a list of sizes per
    level (torchvision's MobileNetV3-FPN: ``[[32, 64, 128, 256, 512]] * 3``)."""
    ratios = tuple(aspect_ratios)
    if len(names) == 1:
        flat = sizes[0] if sizes and isinstance(sizes[0], list) else sizes
        return Fp32Anchors((tuple(flat or [16, 32, 64]),), (ratios,))
    sizes = sizes or [32 * 2**i for i in range(len(names))]
    if len(sizes) != len(names):
        raise ValueError(
            f"anchor_sizes needs one size (or list of sizes) per feature map "
            f"({len(names)}: {names}), got {sizes}"
        )
    per_level = tuple(tuple(s) if isinstance(s, list) else (s,) for s in sizes)
    return Fp32Anchors(per_level, (ratios,) * len(names))


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
