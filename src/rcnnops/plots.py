"""Pictures people would rather look at than read: loss curves, precision-recall
curves, detections (boxes, labels, masks) drawn on images.

Pure functions of arrays and records; matplotlib (Agg) is imported lazily.
Boxes are COCO result records (``bbox`` xywh) or xyxy where named so.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int | None = 100) -> Path:
    """:func:`rcnnops.files.write_figure`, then close ``fig``."""
    from rcnnops.files import write_figure

    try:
        return write_figure(fig, Path(path), dpi)
    finally:
        pyplot().close(fig)


def write_loss_csv(steps_log: list[dict], path: Path) -> None:
    """Per-step training losses as CSV (``step``, ``loss_total``, ``loss_*``, ``lr``)."""
    keys = sorted({k for row in steps_log for k in row} - {"step"})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", *(k.removeprefix("train/") for k in keys)])
        for row in steps_log:
            w.writerow([row["step"], *(row.get(k, "") for k in keys)])


def plot_loss(steps_log: list[dict], path: Path, title: str) -> None:
    """Total and per-term training loss against the step (log scale)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    steps = [r["step"] for r in steps_log]
    keys = sorted({k for r in steps_log for k in r if k.startswith("train/loss")})
    for k in keys:
        ax.plot(
            steps,
            [r.get(k, np.nan) for r in steps_log],
            label=k.removeprefix("train/"),
            linewidth=2.0 if k == "train/loss_total" else 1.0,
        )
    ax.set(title=f"{title}: training loss", xlabel="step", ylabel="loss")
    if steps_log:
        ax.set_yscale("log")
        ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)


def plot_pr(curves: dict[str, np.ndarray], names: Sequence[str], path: Path, title: str) -> None:
    """Precision-recall curves from COCOeval's ``precision[T, R, K, A, M]``, one
    row per IoU type in ``curves`` (``bbox``, ``segm``): the mean over classes
    at IoU .50/.75, and one curve per class at .50."""
    plt = pyplot()
    fig, axes = plt.subplots(len(curves), 2, figsize=(11, 4.5 * len(curves)), squeeze=False)
    for (iou_type, precision), row in zip(curves.items(), axes, strict=True):
        recall = np.linspace(0, 1, precision.shape[1])
        for t, iou in ((0, 0.5), (5, 0.75)):
            p = precision[t, :, :, 0, -1]
            valid = (p > -1).all(axis=0)
            if valid.any():
                row[0].plot(recall, p[:, valid].mean(axis=1), label=f"IoU={iou:.2f}")
        row[0].set(
            title=f"{title} {iou_type}: mean over classes",
            xlabel="recall",
            ylabel="precision",
            xlim=(0, 1),
            ylim=(0, 1.02),
        )
        row[0].legend(loc="lower left")
        for k, name in enumerate(names):
            p = precision[0, :, k, 0, -1]
            if (p > -1).all():
                row[1].plot(recall, p, label=name)
        row[1].set(
            title=f"{iou_type} per class, IoU=0.50", xlabel="recall", xlim=(0, 1), ylim=(0, 1.02)
        )
        if 0 < len(row[1].lines) <= 12:
            row[1].legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)


DRAWN_SIDE = 1024  # pixels: a figure's panel is a few hundred


def shrunk(image: np.ndarray, max_side: int) -> np.ndarray:
    """``image`` (``uint8 [H, W, 3]``) reduced to at most ``max_side`` pixels on its
    longer side (Pillow's antialiased bilinear), or itself."""
    h, w = image.shape[:2]
    k = max_side / max(h, w)
    if k >= 1:
        return image
    from PIL import Image

    small = Image.fromarray(image).resize((max(1, round(w * k)), max(1, round(h * k))))
    return np.asarray(small)


def draw_detections(
    ax,
    image: np.ndarray,
    records: Sequence[dict],
    names: dict[int, str],
    size: tuple[int, int] | None = None,
    max_side: int = DRAWN_SIDE,
) -> None:
    """Draw COCO result ``records`` (``bbox`` xywh, ``category_id``, ``score``,
    optional ``segmentation`` RLE) on ``image`` (``uint8 [H, W, 3]``) in ``ax``.
    ``size`` ``(H, W)``: the frame the records are in, when ``image`` is a smaller
    copy of that picture. An image longer than ``max_side`` pixels is drawn from
    such a copy (a 7000x5000 photo's float canvas alone is 420 MB)."""
    from matplotlib import colormaps

    from rcnnops.data.masks import decode

    h, w = size or image.shape[:2]
    image = shrunk(image, max_side)
    ch, cw = image.shape[:2]
    rows, cols = (np.arange(ch) * h) // ch, (np.arange(cw) * w) // cw  # nearest
    canvas = image.astype(np.float32) / 255.0
    colours = colormaps["tab10"]
    for i, r in enumerate(records):
        if "segmentation" in r:
            m = decode(r["segmentation"], w, h).astype(bool)
            if (ch, cw) != (h, w):
                m = m[np.ix_(rows, cols)]
            canvas[m] = 0.5 * canvas[m] + 0.5 * np.asarray(colours(i % 10)[:3])
    ax.imshow(canvas, extent=(0, w, h, 0))
    for i, r in enumerate(records):
        x, y, bw, bh = r["bbox"]
        c = colours(i % 10)
        ax.add_patch(_rect(x, y, bw, bh, c))
        label = f"{names.get(r['category_id'], r['category_id'])} {r['score']:.2f}"
        ax.text(
            x,
            y,
            label,
            fontsize=6,
            color="white",
            va="bottom",
            bbox={"facecolor": c, "alpha": 0.8, "pad": 1, "linewidth": 0},
        )
    ax.set_axis_off()


def _rect(x: float, y: float, w: float, h: float, colour):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), w, h, fill=False, edgecolor=colour, linewidth=1.2)


def plot_samples(
    images: Sequence[np.ndarray],
    records: Sequence[Sequence[dict]],
    names: dict[int, str],
    path: Path,
    title: str,
    columns: int = 4,
) -> None:
    """A grid of images with their detections (boxes, labels, scores, masks)."""
    plt = pyplot()
    n = max(1, len(images))
    cols = min(columns, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, image, recs in zip(axes.flat, images, records, strict=False):
        draw_detections(ax, image, recs, names)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
