"""Fast R-CNN (Girshick, 2015): one backbone pass per image, RoI pooling over
precomputed (selective search) proposals, two FC layers, sibling softmax and
box-regression heads, multi-task loss.

The variant's difference from the shared parts: the proposal source is
:class:`proposals.PrecomputedProposals` (instead of an RPN), the RoI op defaults
to the paper's 7x7 RoIPool, and sampling follows the paper (2 images x 64 RoIs,
25 % foreground at IoU >= 0.5, background in [0.1, 0.5)). The paper's truncated
SVD of the FC layers at test time is :func:`roi.compress`, applied on load.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from rcnnops.models import backbones, roi
from rcnnops.models.proposals import PrecomputedProposals


class FastRCNN(nn.Module):
    """``model(images, targets, proposals)`` -> losses (train);
    ``model(images, proposals=proposals)`` -> detections (eval).

    ``images``: list of ``float [3, H, W]`` in [0, 1]; ``proposals``: list of
    ``Tensor[N_i, 4]`` xyxy in the same frame as the images (required).
    Detections: ``boxes`` xyxy pixels of the input image, ``labels``, ``scores``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        transform: GeneralizedRCNNTransform,
        proposal_source: PrecomputedProposals,
        roi_heads: nn.Module,
    ) -> None:
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.proposal_source = proposal_source
        self.roi_heads = roi_heads

    def forward(self, images, targets=None, proposals=None):
        if self.training and targets is None:
            raise ValueError("targets are required in training mode")
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        images, targets = self.transform(images, targets)
        props = self.proposal_source(proposals, original_sizes, images.image_sizes)
        features = self.backbone(images.tensors)
        detections, losses = self.roi_heads(features, props, images.image_sizes, targets)
        if self.training:
            return losses
        return self.transform.postprocess(detections, images.image_sizes, original_sizes)


def build(
    num_classes: int,
    backbone: str = "small",
    stride: int = 8,
    norm: str = "auto",
    pretrained: str | None = None,
    min_size: int = 800,
    max_size: int = 1333,
    roi_op: str = "pool",
    sampling_ratio: int = 2,
    box_head: str = "mlp",
    representation_size: int = 256,
    proposals_train: int = 2000,
    proposals_test: int = 2000,
    box_batch_size_per_image: int = 64,
    box_positive_fraction: float = 0.25,
    fg_iou: float = 0.5,
    bg_iou_low: float = 0.1,
    box_score_thresh: float = 0.01,
    box_nms_thresh: float = 0.3,
    box_detections_per_img: int = 100,
) -> FastRCNN:
    """A Fast R-CNN for ``num_classes`` classes including background (K + 1)."""
    body = backbones.build_backbone(backbone, norm, pretrained is not None, stride)
    names = backbones.feature_names(body)
    heads = roi.ProposalRoIHeads(
        roi.roi_pooler(names, 7, roi_op, sampling_ratio),
        roi.box_head(
            box_head,
            body.out_channels,
            7,
            representation_size,
            backbones.norm_layer(norm, pretrained is not None),
        ),
        FastRCNNPredictor(representation_size, num_classes),
        **roi.proposal_sampling(
            fg_iou,
            bg_iou_low,
            box_batch_size_per_image,
            box_positive_fraction,
            box_score_thresh,
            box_nms_thresh,
            box_detections_per_img,
        ),
    )
    model = FastRCNN(
        body,
        backbones.image_transform(min_size, max_size),
        PrecomputedProposals(proposals_train, proposals_test),
        heads,
    )
    return model
