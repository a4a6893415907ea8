"""Parity of an export with the eager model (see :mod:`.export`): detections
matched order-free, then boxes, scores and masks compared within tolerances."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

BOX_TOL, SCORE_TOL, MASK_IOU = 0.5, 1e-3, 0.99


@dataclass
class ParityRow:
    image: str
    size: str
    detections: int
    same_count_labels: bool
    box_diff: float
    score_diff: float
    mask_iou: float | None

    @property
    def ok(self) -> bool:
        return (self.same_count_labels and self.box_diff <= BOX_TOL
                and self.score_diff <= SCORE_TOL
                and (self.mask_iou is None or self.mask_iou >= MASK_IOU))  # fmt: skip


def _match(eager: dict, exported: dict) -> list[int] | None:
    """For each eager detection, the exported one that is the same detection (same
    label, score within the tolerance, the closest box), each used once; None if
    some has no partner. Order-free: an untrained or barely trained model ties
    scores, and the order of ties is not part of the contract."""
    used: set[int] = set()
    match = []
    for i in range(len(eager["scores"])):
        same = (exported["labels"].long() == eager["labels"][i].long()) & (
            (exported["scores"] - eager["scores"][i]).abs() <= SCORE_TOL
        )
        dist = (exported["boxes"] - eager["boxes"][i]).abs().amax(1)
        dist = torch.where(same, dist, torch.full_like(dist, float("inf")))
        if used:
            dist[list(used)] = float("inf")
        j = int(dist.argmin()) if len(dist) else -1
        if j < 0 or not torch.isfinite(dist[j]):
            return None
        used.add(j)
        match.append(j)
    return match


def _above_cap_ties(out: dict, cap: int) -> dict:
    """Detections of ``out`` minus those tied with the last kept score when the
    ``cap`` (detections per image) was reached: which of equals fill the last
    places is arbitrary, in torchvision's eager model as in any export."""
    scores = out["scores"]
    if len(scores) < cap or len(scores) == 0:
        return out
    keep = scores > scores.min() + SCORE_TOL
    return {k: v[keep] for k, v in out.items() if isinstance(v, torch.Tensor)}


def compare(name: str, eager: dict, exported: dict, cap: int = 10**9) -> ParityRow:
    size = "x".join(map(str, eager.get("_size", ())))
    n, m = len(eager["scores"]), len(exported["scores"])
    eager, exported = _above_cap_ties(eager, cap), _above_cap_ties(exported, cap)
    match = _match(eager, exported) if n == m else None
    if match is None:
        same = match is not None
        return ParityRow(name, size, n, same, 0.0 if same else float("inf"),
                         0.0 if same else float("inf"), None)  # fmt: skip
    if not match:
        return ParityRow(name, size, n, True, 0.0, 0.0, None)
    other = {k: v[match] for k, v in exported.items()}
    box = (eager["boxes"] - other["boxes"]).abs().max().item()
    score = (eager["scores"] - other["scores"]).abs().max().item()
    iou = None
    if "masks" in eager:
        a, b = eager["masks"][:, 0] > 0.5, other["masks"][:, 0] > 0.5
        inter = (a & b).flatten(1).sum(1).float()
        union = (a | b).flatten(1).sum(1).float()
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).min()
        iou = iou.item()
    return ParityRow(name, size, n, True, box, score, iou)


def parity(model: nn.Module, runner: Any, images: list[tuple[str, torch.Tensor]]) -> list:
    """One :class:`ParityRow` per image: the eager model against the export."""
    cap = model.roi_heads.detections_per_img
    rows = []
    for name, image in images:
        image = image.contiguous()
        with torch.no_grad():
            eager = model([image])[0]
        eager["_size"] = tuple(image.shape[1:])
        rows.append(compare(name, eager, runner(image), cap))
    return rows


def parity_table(rows: list[ParityRow]) -> str:
    from rcnnops.tables import markdown_table

    columns = ["image", "size", "detections", "count+labels", "max box diff px",
               "max score diff", "min mask IoU", "ok"]  # fmt: skip
    return markdown_table(columns, [
        [r.image, r.size, str(r.detections), "same" if r.same_count_labels else "DIFFERENT",
         f"{r.box_diff:.2g}", f"{r.score_diff:.2g}",
         "-" if r.mask_iou is None else f"{r.mask_iou:.4f}", "yes" if r.ok else "NO"]
        for r in rows
    ])  # fmt: skip
