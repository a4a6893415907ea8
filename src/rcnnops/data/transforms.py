"""Joint image + target transforms (boxes xyxy pixels, optional masks)."""

from __future__ import annotations

import torch


class RandomHorizontalFlip:
    """Flip image, boxes (and masks, proposals) left-right with probability ``p``.

    Draws from torch's global RNG, which training checkpoints, so a resumed
    run sees the same flips as an uninterrupted one.
    """

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        if self.p <= 0 or torch.rand(()) >= self.p:
            return image, target
        width = image.shape[-1]
        image = image.flip(-1)
        target = dict(target)
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
        target["boxes"] = boxes
        if "proposals" in target:
            props = target["proposals"].clone()
            props[:, [0, 2]] = width - target["proposals"][:, [2, 0]]
            target["proposals"] = props
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
        return image, target
