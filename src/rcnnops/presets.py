"""Named sets of params: ``rcnnops run --preset NAME`` writes one into params.yaml as
``--set`` does (DVC sees ordinary params), ``rcnnops presets`` lists them.

The torchvision architectures below make rcnnops' ``faster_rcnn`` / ``mask_rcnn``
torchvision's ``fasterrcnn_resnet50_fpn``, ``fasterrcnn_mobilenet_v3_large_fpn``
and ``maskrcnn_resnet50_fpn`` layer for layer (same tensor names and shapes, same
post-processing): tests/code/test_parity.py loads the same weights into both and
compares their detections on COCO photos. So torchvision's published accuracy
(box AP 37.0, mask AP 34.6 on COCO val2017 with the COCO_V1 weights) is what
these settings give with those weights.
"""

from __future__ import annotations

from typing import Any

TV = "torchvision:"

# torchvision's detector defaults (torchvision.models.detection.FasterRCNN / MaskRCNN).
FASTERRCNN_RESNET50_FPN: dict[str, Any] = {
    "backbone": "resnet50_fpn",
    "norm": "auto",  # frozen BatchNorm with pretrained weights, as torchvision
    "min_size": 800,
    "max_size": 1333,
    "anchor_sizes": None,  # 32, 64, 128, 256, 512: one per FPN level
    "roi_op": "align",
    "sampling_ratio": 2,
    "box_head": "mlp",
    "representation_size": 1024,
    "rpn_pre_nms_top_n_train": 2000,
    "rpn_post_nms_top_n_train": 2000,
    "rpn_pre_nms_top_n_test": 1000,
    "rpn_post_nms_top_n_test": 1000,
    "rpn_score_thresh": 0.0,
    "box_batch_size_per_image": 512,
    "box_score_thresh": 0.05,
    "box_nms_thresh": 0.5,
    "box_detections_per_img": 100,
}
FASTERRCNN_MOBILENET_V3_LARGE_FPN = FASTERRCNN_RESNET50_FPN | {
    "backbone": "mobilenet_v3_fpn",
    "anchor_sizes": [[32, 64, 128, 256, 512]] * 3,
    "rpn_score_thresh": 0.05,
}
MASKRCNN_RESNET50_FPN = FASTERRCNN_RESNET50_FPN | {
    "mask_roi_size": 14,
    "mask_roi_op": "align",
    "mask_sampling_ratio": 2,
    "mask_head_channels": 256,
    "mask_head_layers": 4,
    "mask_head_norm": "none",
}
# The same architectures by torchvision's builder name, with their COCO weights.
TORCHVISION_DETECTORS = {
    "fasterrcnn_resnet50_fpn": (
        "faster_rcnn",
        FASTERRCNN_RESNET50_FPN,
        f"{TV}FasterRCNN_ResNet50_FPN_Weights.COCO_V1",
    ),
    "fasterrcnn_mobilenet_v3_large_fpn": (
        "faster_rcnn",
        FASTERRCNN_MOBILENET_V3_LARGE_FPN,
        f"{TV}FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1",
    ),
    "maskrcnn_resnet50_fpn": (
        "mask_rcnn",
        MASKRCNN_RESNET50_FPN,
        f"{TV}MaskRCNN_ResNet50_FPN_Weights.COCO_V1",
    ),
}


def _model(variant: str, model: dict[str, Any], pretrained: str | None) -> dict[str, Any]:
    return {f"train.{variant}.model": dict(model, pretrained=pretrained)}


def _solver(variant: str, **values: Any) -> dict[str, Any]:
    return {f"train.{variant}.{k}": v for k, v in values.items()}


# torchvision's object detection tutorial (Penn-Fudan): SGD lr 0.005, momentum 0.9,
# weight decay 5e-4, lr x 0.1 every 3 epochs, 2 images per batch, warm-up in the
# first epoch; here 10 epochs.
_TUTORIAL = {
    "epochs": 10,
    "batch_size": 2,
    "lr": 0.005,
    "momentum": 0.9,
    "weight_decay": 0.0005,
    "warmup_iters": 100,
    "lr_steps": [3, 6, 9],
    "gamma": 0.1,
    "keep": "best",  # small datasets: register the best validated epoch
}
# torchvision's COCO reference (references/detection, README): 26 epochs, lr 0.02
# for 16 images per step (8 GPUs x 2: lr 0.0025 per 2-image process, scaled by
# train.nproc), lr x 0.1 at epochs 16 and 22, 1000 warm-up iterations, weight decay
# 1e-4, from ImageNet ResNet-50 weights.
_REFERENCE = {
    "epochs": 26,
    "batch_size": 2,
    "lr": 0.0025,
    "momentum": 0.9,
    "weight_decay": 0.0001,
    "warmup_iters": 1000,
    "lr_steps": [16, 22],
    "gamma": 0.1,
    "keep": "last",
}
_FAST_RCNN_600 = {  # the Fast R-CNN paper's scale, an ImageNet backbone
    "backbone": "resnet50_fpn",
    "min_size": 600,
    "max_size": 1000,
    "roi_op": "align",
    "box_head": "mlp",
    "representation_size": 1024,
}
_IMAGENET_R50 = f"{TV}ResNet50_Weights.IMAGENET1K_V2"
# R-CNN as the paper runs it (an ImageNet CNN fine-tuned on 227 px warped crops with
# 16 px of context, 128 RoIs per step of which 32 are objects: 64 per image x 2
# images, 25 % foreground), here on an ImageNet ResNet-50 instead of AlexNet/VGG16.
_RCNN_227 = {
    "crop_net": "resnet50",
    "norm": "auto",
    "warp_size": 227,
    "context": 16,
    "min_size": 600,
    "max_size": 1000,
    "representation_size": 1024,
    "box_batch_size_per_image": 64,
    "crop_chunk": 64,
}

# The repository's params.yaml (tests/code/test_presets.py keeps the two equal):
# small backbones from scratch at 128 px, within minutes on a CPU.
_SMALL = {
    "backbone": "small",
    "stride": 4,
    "norm": "auto",
    "pretrained": None,
    "min_size": 128,
    "max_size": 128,
}
_SMALL_RPN = _SMALL | {
    "anchor_sizes": [16, 32, 64],
    "roi_op": "align",
    "sampling_ratio": 1,
    "box_head": "mlp_bn",
    "representation_size": 256,
    "box_batch_size_per_image": 64,
    "rpn_pre_nms_top_n_train": 600,
    "rpn_post_nms_top_n_train": 300,
    "rpn_pre_nms_top_n_test": 300,
    "rpn_post_nms_top_n_test": 100,
}
_SCRATCH = {
    "momentum": 0.9,
    "weight_decay": 0.0001,
    "warmup_iters": 100,
    "gamma": 0.1,
    "keep": "last",
    "early_stop": None,
}
_CPU_SCRATCH = (
    {"train.faster_rcnn.model": _SMALL_RPN}
    | _solver("faster_rcnn", epochs=9, batch_size=4, lr=0.02, lr_steps=[6, 8], **_SCRATCH)
    | {
        "train.mask_rcnn.model": _SMALL_RPN
        | {
            "mask_roi_size": 14,
            "mask_roi_op": "align",
            "mask_sampling_ratio": 1,
            "mask_head_channels": 32,
            "mask_head_layers": 1,
        }
    }
    | _solver("mask_rcnn", epochs=9, batch_size=4, lr=0.02, lr_steps=[6, 8], **_SCRATCH)
    | {
        "train.fast_rcnn.model": _SMALL
        | {
            "roi_op": "pool",
            "box_head": "mlp_bn",
            "representation_size": 256,
            "box_batch_size_per_image": 64,
            "proposals_train": 2000,
            "proposals_test": 2000,
        }
    }
    | _solver("fast_rcnn", epochs=6, batch_size=2, lr=0.01, lr_steps=[4, 5], **_SCRATCH)
    | {
        "train.rcnn.model": {
            "warp_size": 32,
            "context": 2,
            "crop_net": "small",
            "width": 32,
            "min_size": 128,
            "max_size": 128,
            "representation_size": 256,
            "box_batch_size_per_image": 32,
            "proposals_train": 2000,
            "proposals_test": 2000,
            "classifier": "softmax",
        }
    }
    | _solver("rcnn", epochs=6, batch_size=2, lr=0.01, lr_steps=[4, 5], **_SCRATCH)
    | {"proposals.max_side": 640}
)

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "cpu-scratch": (
        "today's defaults (make run): small backbones from scratch at 128 px, on a CPU",
        _CPU_SCRATCH,
    ),
    "finetune-coco": (
        "fine-tune torchvision's COCO weights on your photos (the tutorial's recipe, "
        "ResNet-50-FPN, 800/1333, frozen BN); ImageNet ResNet-50 for fast_rcnn at 600 px "
        "and for rcnn's 227 px crops",
        _model("faster_rcnn", FASTERRCNN_RESNET50_FPN, TORCHVISION_DETECTORS[
            "fasterrcnn_resnet50_fpn"][2])
        | _solver("faster_rcnn", **_TUTORIAL)
        | _model("mask_rcnn", MASKRCNN_RESNET50_FPN, TORCHVISION_DETECTORS[
            "maskrcnn_resnet50_fpn"][2])
        | _solver("mask_rcnn", **_TUTORIAL)
        | _model("fast_rcnn", _FAST_RCNN_600 | {"box_batch_size_per_image": 64}, _IMAGENET_R50)
        | _solver("fast_rcnn", **_TUTORIAL)
        | _model("rcnn", _RCNN_227, _IMAGENET_R50)
        | _solver("rcnn", **_TUTORIAL)
        | {"proposals.max_side": 640},
    ),
    "torchvision-reference": (
        "torchvision's COCO reference: its detectors layer for layer, 26 epochs, lr 0.02 "
        "per 16 images (set train.nproc), steps at 16 and 22, from ImageNet ResNet-50",
        _model("faster_rcnn", FASTERRCNN_RESNET50_FPN, f"{TV}ResNet50_Weights.IMAGENET1K_V1")
        | _solver("faster_rcnn", **_REFERENCE)
        | _model("mask_rcnn", MASKRCNN_RESNET50_FPN, f"{TV}ResNet50_Weights.IMAGENET1K_V1")
        | _solver("mask_rcnn", **_REFERENCE),
    ),
}  # fmt: skip


def assignments(name: str) -> dict[str, Any]:
    """The params assignments of preset ``name`` (for ``set_params``)."""
    from rcnnops.config import ParamsError

    if name not in PRESETS:
        raise ParamsError(f"--preset {name!r}: no such preset; choose one of {sorted(PRESETS)}")
    return dict(PRESETS[name][1])
