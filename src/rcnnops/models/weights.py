"""Weights from outside the training run: a local pretrained file, and the size."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


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


def count_parameters(model: nn.Module) -> int:
    """Number of parameter values (weights and biases; buffers not counted)."""
    return sum(p.numel() for p in model.parameters())
