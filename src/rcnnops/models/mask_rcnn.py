"""Mask R-CNN (He et al., 2017): Faster R-CNN plus a mask branch.

The difference from Faster R-CNN, and all this module holds: RoIAlign
(bilinear sampling, no quantisation) at 14x14 feeding a small FCN that
predicts one 28x28 sigmoid mask per class, in parallel with classification;
the mask of the predicted class is pasted back at full image resolution.
The box branch keeps RoIAlign at 7x7 (``roi_op: align``).
"""

from __future__ import annotations

from typing import Any

from torchvision.models.detection import mask_rcnn as tv

from rcnnops.models import backbones, faster_rcnn, roi


class MaskRCNN(tv.MaskRCNN):
    """``model(images, targets)`` -> losses (train); ``model(images)`` -> detections.

    Targets add ``masks`` uint8 ``[N, H, W]`` (one per box, image frame) to
    ``boxes`` xyxy pixels and ``labels`` 1..K. Detections: ``boxes`` xyxy
    pixels of the input image, ``labels``, ``scores`` and ``masks`` float
    ``[N, 1, H, W]`` (probabilities; threshold at 0.5 for a binary mask).
    Losses add ``loss_mask`` (per-pixel binary cross-entropy on the mask of
    the ground-truth class only, so classes do not compete).
    """

    def forward(self, images, targets=None, proposals=None):  # noqa: D102
        if proposals is not None:
            raise ValueError(
                "Mask R-CNN computes its own proposals with its RPN; "
                "precomputed proposals are for rcnn and fast_rcnn"
            )
        return super().forward(images, targets)


def build(
    num_classes: int,
    pretrained: str | None = None,
    mask_roi_size: int = 14,
    mask_sampling_ratio: int = 2,
    mask_head_channels: int = 256,
    mask_head_layers: int = 4,
    mask_roi_op: str = "align",
    mask_head_norm: str = "auto",
    roi_op: str = "align",
    **params: Any,
) -> MaskRCNN:
    """A Mask R-CNN for ``num_classes`` classes *including* background (K + 1).

    ``params`` are Faster R-CNN's (``faster_rcnn.components``). The mask head is
    ``mask_head_layers`` 3x3 convs of ``mask_head_channels`` on
    ``mask_roi_size`` RoIAlign features (the paper: 4 x 256 on 14x14), then a
    2x deconvolution and a per-class 1x1 predictor. ``mask_roi_op: pool``
    swaps the mask head's RoIAlign for quantised RoIPool (single-map backbones
    only): the paper's ablation (RoIAlign: +3.4 mask AP), for benchmarks.
    ``mask_head_norm``: ``auto`` normalises the head's convs as the backbone is;
    ``none`` leaves them plain, as torchvision's ``maskrcnn_resnet50_fpn``.
    """
    body, kwargs = faster_rcnn.components(
        num_classes, pretrained=pretrained, roi_op=roi_op, **params
    )
    names = backbones.feature_names(body)
    norm = None
    if mask_head_norm != "none":
        norm = backbones.norm_layer(params.get("norm", "auto"), pretrained is not None)
    channels = [mask_head_channels] * mask_head_layers
    model = MaskRCNN(
        body,
        mask_roi_pool=roi.roi_pooler(names, mask_roi_size, mask_roi_op, mask_sampling_ratio),
        mask_head=tv.MaskRCNNHeads(body.out_channels, channels, 1, norm_layer=norm),
        mask_predictor=tv.MaskRCNNPredictor(channels[-1], channels[-1], num_classes),
        **kwargs,
    )
    return model


build.params = (build, faster_rcnn.components)  # where its parameters are declared
