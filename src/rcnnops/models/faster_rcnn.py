"""Faster R-CNN (Ren et al., 2015): a learned RPN feeds the Fast R-CNN head.

torchvision's ``FasterRCNN`` composed from our shared parts; this module holds
only the variant's difference: the RPN as the proposal source.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision.models.detection import faster_rcnn as tv
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

from rcnnops.models import backbones, roi
from rcnnops.models.proposals import anchor_generator


class FasterRCNN(tv.FasterRCNN):
    """``model(images, targets)`` -> losses (train); ``model(images)`` -> detections.

    ``images``: list of ``float [3, H, W]`` in [0, 1]; targets hold ``boxes``
    ``[N, 4]`` xyxy pixels and ``labels`` int64 1..K. Detections: ``boxes``
    xyxy pixels of the input image, ``labels``, ``scores``.
    """

    def forward(self, images, targets=None, proposals=None):  # noqa: D102
        if proposals is not None:
            raise ValueError(
                "Faster R-CNN computes its own proposals with its RPN; "
                "precomputed proposals are for rcnn and fast_rcnn"
            )
        return super().forward(images, targets)


def components(
    num_classes: int,
    backbone: str = "small",
    stride: int = 8,
    norm: str = "auto",
    pretrained: str | None = None,
    min_size: int = 800,
    max_size: int = 1333,
    anchor_sizes: list[int] | list[list[int]] | None = None,
    aspect_ratios: list[float] = (0.5, 1.0, 2.0),
    representation_size: int = 256,
    box_head: str = "mlp",
    roi_op: str = "align",
    sampling_ratio: int = 2,
    rpn_pre_nms_top_n_train: int = 1000,
    rpn_post_nms_top_n_train: int = 500,
    rpn_pre_nms_top_n_test: int = 500,
    rpn_post_nms_top_n_test: int = 300,
    rpn_score_thresh: float = 0.0,
    box_batch_size_per_image: int = 256,
    box_score_thresh: float = 0.01,
    box_nms_thresh: float = 0.5,
    box_detections_per_img: int = 100,
) -> tuple[nn.Module, dict[str, Any]]:
    """The backbone and torchvision ``FasterRCNN`` keyword arguments of a Faster
    R-CNN for ``num_classes`` classes *including* background (K + 1); the other
    arguments are torchvision's (``min_size``/``max_size``: the image rescaling).
    ``pretrained`` (loaded by the train stage, see :mod:`rcnnops.models.weights`)
    freezes BatchNorm under ``norm: auto``. Mask R-CNN extends these.
    """
    body = backbones.build_backbone(backbone, norm, pretrained is not None, stride)
    names = backbones.feature_names(body)
    head_norm = backbones.norm_layer(norm, pretrained is not None)
    kwargs = {
        "num_classes": None,
        "min_size": min_size,
        "max_size": max_size,
        "image_mean": list(backbones.IMAGE_MEAN),
        "image_std": list(backbones.IMAGE_STD),
        "rpn_anchor_generator": anchor_generator(names, anchor_sizes, list(aspect_ratios)),
        "rpn_pre_nms_top_n_train": rpn_pre_nms_top_n_train,
        "rpn_post_nms_top_n_train": rpn_post_nms_top_n_train,
        "rpn_pre_nms_top_n_test": rpn_pre_nms_top_n_test,
        "rpn_post_nms_top_n_test": rpn_post_nms_top_n_test,
        "rpn_score_thresh": rpn_score_thresh,
        "box_roi_pool": roi.roi_pooler(names, 7, roi_op, sampling_ratio),
        "box_head": roi.box_head(box_head, body.out_channels, 7, representation_size, head_norm),
        "box_predictor": FastRCNNPredictor(representation_size, num_classes),
        "box_batch_size_per_image": box_batch_size_per_image,
        "box_score_thresh": box_score_thresh,
        "box_nms_thresh": box_nms_thresh,
        "box_detections_per_img": box_detections_per_img,
    }
    return body, kwargs


def build(num_classes: int, pretrained: str | None = None, **params: Any) -> FasterRCNN:
    """A Faster R-CNN; ``params`` are :func:`components`' keyword arguments."""
    body, kwargs = components(num_classes, pretrained=pretrained, **params)
    model = FasterRCNN(body, **kwargs)
    return model


build.params = (build, components)  # where its parameters are declared (models.build_model)
