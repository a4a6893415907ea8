"""What stays float32 when a model runs under autocast (bf16 or fp16).

Autocast runs convolutions and linear layers in the low dtype, and a tensor
keeps that dtype downstream. torchvision's detection code then decodes boxes,
clips them, runs NMS and computes losses in whatever dtype the heads gave: in
bf16 an image coordinate near 800 px is only known to 4 px. So the heads'
outputs (box deltas, class logits, objectness, mask logits) are cast to fp32 as
they leave the head, and everything after them is fp32 arithmetic, as
torchvision's reference AMP training gets from its fp16 boxes on CUDA only by
accident of range. The RoI ops compute in fp32 themselves (:mod:`.roi`).

Outside autocast the heads already produce fp32 and the hook changes nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead

from rcnnops.models.svm import SVMPredictor

# The last module of each head: its outputs are what box decoding, NMS and the losses read.
HEADS: tuple[type[nn.Module], ...] = (RPNHead, FastRCNNPredictor, MaskRCNNPredictor, SVMPredictor)


def as_fp32(value: Any) -> Any:
    """``value`` with every low-precision floating tensor in it cast to float32
    (tensors, and lists / tuples / dicts of them)."""
    if isinstance(value, torch.Tensor):
        low = value.is_floating_point() and value.dtype != torch.float64
        return value.float() if low else value
    if isinstance(value, (list, tuple)):
        return type(value)(as_fp32(v) for v in value)
    if isinstance(value, dict):
        return {k: as_fp32(v) for k, v in value.items()}
    return value


def _fp32_hook(module: nn.Module, inputs: Any, output: Any) -> Any:
    return as_fp32(output)


def keep_heads_fp32(model: nn.Module) -> nn.Module:
    """Register the fp32 output cast on every head of ``model`` (once); returns it."""
    for m in model.modules():
        if isinstance(m, HEADS) and not getattr(m, "_rcnnops_fp32", False):
            m.register_forward_hook(_fp32_hook)
            m._rcnnops_fp32 = True
    return model
