"""R-CNN (Girshick et al., 2014): every proposal cropped from the image with
context padding, warped to a fixed size and classified by a CNN of its own.

The variant's difference from the shared parts: RoI "features" are warped
image crops (:class:`WarpCrops`) fed through a whole CNN (:class:`CropNet`)
instead of pooled backbone features, so the network runs once per proposal
(the cost Fast R-CNN removes). Sampling (fg IoU >= 0.5, bg [0.1, 0.5), 25 %
foreground), K+1-way classification, class-specific ``(t_x, t_y, t_w, t_h)``
box regression and per-class NMS are the shared :class:`parts.ProposalRoIHeads`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, roi_align

from rcnnops.models import parts
from rcnnops.models.fast_rcnn import FastRCNN


def expand_boxes(boxes: torch.Tensor, warp_size: int, context: int) -> torch.Tensor:
    """Grow ``[N, 4]`` xyxy boxes about their centres so that, once warped to
    ``warp_size``, ``context`` pixels of surroundings show on every side
    (the paper: 16 px at 227)."""
    if context == 0:
        return boxes
    factor = warp_size / (warp_size - 2 * context)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) / 2 * factor
    return torch.cat([centre - half, centre + half], dim=1)


class WarpCrops(MultiScaleRoIAlign):
    """Crop each proposal (with context) out of the *image* and warp it to
    ``warp_size x warp_size`` by bilinear resampling; outside the image is 0
    (the mean colour after normalisation, as the paper pads with the mean).

    Same call as a RoI pooler: ``(features, boxes, image_sizes)`` with
    ``features["image"]`` the normalised image batch ``[B, 3, H, W]``; returns
    ``[sum N_i, 3, warp_size, warp_size]``. (Subclasses ``MultiScaleRoIAlign``
    only because torchvision's ``RoIHeads`` type-checks its pooler.)
    """

    def __init__(self, warp_size: int = 227, context: int = 16) -> None:
        super().__init__(["image"], warp_size, sampling_ratio=2)
        if not 0 <= 2 * context < warp_size:
            raise ValueError(f"context {context} leaves nothing of a {warp_size}px warp")
        self.warp_size, self.context = warp_size, context

    def forward(self, features, boxes, image_sizes):
        images = features["image"]
        grown = [expand_boxes(b.to(images.dtype), self.warp_size, self.context) for b in boxes]
        return roi_align(
            images, grown, self.warp_size, spatial_scale=1.0, sampling_ratio=2, aligned=True
        )


class CropNet(nn.Module):
    """The per-proposal CNN: ``[R, 3, S, S]`` crops -> ``[R, representation]``.

    Runs in chunks of ``chunk`` crops so testing 2000 proposals per image
    stays within memory.
    """

    def __init__(
        self, representation: int = 256, width: int = 32, norm=nn.BatchNorm2d, chunk: int = 512
    ) -> None:
        super().__init__()
        self.body = parts.SmallBackbone(width=width, out_channels=4 * width, stride=8, norm=norm)
        self.fc = nn.Sequential(
            nn.Flatten(1), nn.Linear(4 * width, representation), nn.ReLU(inplace=True)
        )
        self.chunk = chunk

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        outs = []
        for part in crops.split(self.chunk) if len(crops) else [crops]:
            fmap = self.body(part)["0"]
            outs.append(self.fc(fmap.mean(dim=(2, 3))))
        return torch.cat(outs)


class _ImageAsFeatures(nn.Module):
    """The R-CNN "backbone": passes the normalised image through as ``{"image": x}``."""

    out_channels = 3

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict([("image", x)])


class RCNN(FastRCNN):
    """Same API as :class:`FastRCNN` (proposals required); only the RoI path differs."""


def build(
    num_classes: int,
    warp_size: int = 227,
    context: int = 16,
    width: int = 32,
    norm: str = "batch",
    representation_size: int = 256,
    min_size: int = 800,
    max_size: int = 1333,
    proposals_train: int = 2000,
    proposals_test: int = 2000,
    box_batch_size_per_image: int = 64,
    box_positive_fraction: float = 0.25,
    fg_iou: float = 0.5,
    bg_iou_low: float = 0.1,
    box_score_thresh: float = 0.01,
    box_nms_thresh: float = 0.3,
    box_detections_per_img: int = 100,
    crop_chunk: int = 512,
    pretrained: str | None = None,
) -> RCNN:
    """An R-CNN for ``num_classes`` classes including background (K + 1)."""
    heads = parts.ProposalRoIHeads(
        WarpCrops(warp_size, context),
        CropNet(
            representation_size, width, parts.norm_layer(norm, pretrained is not None), crop_chunk
        ),
        FastRCNNPredictor(representation_size, num_classes),
        fg_iou_thresh=fg_iou,
        bg_iou_thresh=fg_iou,
        batch_size_per_image=box_batch_size_per_image,
        positive_fraction=box_positive_fraction,
        bbox_reg_weights=None,
        score_thresh=box_score_thresh,
        nms_thresh=box_nms_thresh,
        detections_per_img=box_detections_per_img,
        bg_iou_low=bg_iou_low,
    )
    model = RCNN(
        _ImageAsFeatures(),
        GeneralizedRCNNTransform(min_size, max_size, list(parts.IMAGE_MEAN), list(parts.IMAGE_STD)),
        parts.PrecomputedProposals(proposals_train, proposals_test),
        heads,
    )
    if pretrained is not None:
        parts.load_pretrained(model, pretrained)
    return model
