"""Proposal quality: recall at IoU thresholds against the number kept, and MABO.

Recall@(k, t): the share of ground-truth objects (non-crowd) covered by at
least one of an image's top-``k`` proposals with IoU >= ``t``. Mean best
overlap (MABO): the mean over objects of the best IoU any proposal reaches.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

TOP_K = (10, 100, 300, 1000, 2000)
IOUS = (0.5, 0.7)


def best_overlaps(gt: torch.Tensor, proposals: torch.Tensor, top_k: Iterable[int]) -> np.ndarray:
    """``[len(top_k), G]``: each GT box's best IoU among the top-k proposals."""
    ks = list(top_k)
    if len(gt) == 0:
        return np.zeros((len(ks), 0))
    if len(proposals) == 0:
        return np.zeros((len(ks), len(gt)))
    iou = box_iou(gt, proposals)  # [G, P]
    # Running max over proposal rank, read at each k.
    running = iou.cummax(dim=1).values
    cols = [min(k, proposals.shape[0]) - 1 for k in ks]
    return running[:, cols].T.numpy()


def recall_report(
    per_image: Iterable[tuple[torch.Tensor, torch.Tensor]], top_k=TOP_K, ious=IOUS
) -> dict:
    """From ``(gt_boxes, proposals)`` pairs: recall per (IoU, k), MABO per k."""
    chunks = [best_overlaps(g, p, top_k) for g, p in per_image]
    best = np.concatenate(chunks, axis=1) if chunks else np.zeros((len(top_k), 0))
    n = best.shape[1]
    report: dict = {"objects": int(n)}
    for t in ious:
        for i, k in enumerate(top_k):
            report[f"recall@{t:.1f}/{k}"] = float((best[i] >= t).mean()) if n else 0.0
    for i, k in enumerate(top_k):
        report[f"mabo/{k}"] = float(best[i].mean()) if n else 0.0
    return report


def plot_recall(reports: dict[str, dict], path: Path, top_k=TOP_K, ious=IOUS) -> None:
    """Recall against the number of proposals, one line per split and IoU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rcnnops.files import write_figure

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for split, rep in reports.items():
        for t, style in zip(ious, ("-", "--"), strict=False):
            ax.plot(
                top_k,
                [rep[f"recall@{t:.1f}/{k}"] for k in top_k],
                style,
                marker="o",
                label=f"{split}, IoU>={t}",
            )
    ax.set(
        xscale="log",
        xlabel="proposals kept per image",
        ylabel="recall",
        ylim=(0, 1.02),
        title="Selective search recall",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    write_figure(fig, path)
    plt.close(fig)
