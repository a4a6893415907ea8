"""Selective search (Uijlings et al., 2013) through OpenCV's contrib module.

Pure functions: an RGB image in, ranked proposal boxes out, as
``float32 [N, 4]`` xyxy absolute pixels of the image as given, with scores
``float32 [N]`` in (0, 1] that decrease with OpenCV's rank.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torchvision.ops import nms

MODES = ("fast", "quality", "single")


def selective_search(
    image: np.ndarray,
    mode: str = "fast",
    max_boxes: int = 2000,
    min_size: int = 8,
    dedup_iou: float = 0.95,
    seed: int = 0,
    max_side: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Proposals for one ``uint8 [H, W, 3]`` RGB image.

    ``mode``: ``fast`` / ``quality`` (the paper's two strategies) or ``single``
    (one strategy, for tests). Boxes narrower or shorter than ``min_size``
    pixels are dropped; near-duplicates (IoU >= ``dedup_iou`` with a
    higher-ranked box) are removed; at most ``max_boxes`` are kept.
    ``max_side``: an image whose longer side exceeds it is searched downscaled to
    it (cost grows faster than the pixel count) and the boxes are scaled back:
    they are always in pixels of the image as given.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    if mode not in MODES:
        raise ValueError(f"unknown selective search mode {mode!r}; choose one of {MODES}")
    h, w = image.shape[:2]
    scale = 1.0
    if max_side is not None and max(h, w) > max_side:
        scale = max_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    {
        "fast": ss.switchToSelectiveSearchFast,
        "quality": ss.switchToSelectiveSearchQuality,
        "single": ss.switchToSingleStrategy,
    }[mode]()
    rects = np.asarray(ss.process(), dtype=np.int64).reshape(-1, 4)  # (x, y, w, h)
    keep = (rects[:, 2] >= min_size * scale) & (rects[:, 3] >= min_size * scale)
    rects = rank(rects[keep], seed).astype(np.float32)
    boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)
    if scale != 1.0:
        boxes = np.minimum(boxes / np.float32(scale), np.array([w, h, w, h], np.float32))
    boxes = dedup(boxes, dedup_iou)[:max_boxes]
    scores = 1.0 - np.arange(len(boxes), dtype=np.float32) / max(len(boxes), 1)
    return boxes.astype(np.float32), scores.astype(np.float32)


def rank(rects: np.ndarray, seed: int = 0) -> np.ndarray:
    """Order ``(x, y, w, h)`` regions as the paper does, ``level x RND``
    ascending, but reproducibly.

    In the paper (Uijlings et al. 2013, section 3.3) ``level`` counts from the top
    of the hierarchy: the region covering the whole image is 1, so large regions
    tend to come first and a cut at the first N boxes keeps large objects' boxes.
    OpenCV inverts that (its code says so: the lowest, smallest regions first) and
    draws its randomness from ``std::random_device``, so the same image gives the
    same *set* of regions in a different order each call. Here ``level`` is the
    region's rank by area, largest first (merged regions are larger than their
    parts, so this follows the hierarchy from the top), and ``RND`` a uniform
    number hashed from the region's coordinates and ``seed``, so the order depends
    on the image alone.
    """
    rects = np.unique(rects, axis=0)  # strategies repeat regions; sorted, deterministic
    if len(rects) == 0:
        return rects.reshape(0, 4)
    area = rects[:, 2] * rects[:, 3]
    level = np.empty(len(rects))
    level[np.lexsort((rects[:, 1], rects[:, 0], -area))] = np.arange(1, len(rects) + 1)
    mix = np.uint64(0x9E3779B97F4A7C15)
    h = np.full(len(rects), np.uint64(seed) * mix + np.uint64(1))
    for col in range(4):  # a splitmix-style hash of the coordinates
        h = (h ^ rects[:, col].astype(np.uint64)) * mix
        h ^= h >> np.uint64(29)
    rnd = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    order = np.lexsort((np.arange(len(rects)), level * rnd))
    return rects[order]


def dedup(boxes: np.ndarray, iou: float) -> np.ndarray:
    """Drop boxes overlapping a higher-ranked (earlier) kept one by IoU > ``iou``:
    greedy NMS in rank order, so the order of what is kept is unchanged."""
    if len(boxes) == 0 or iou >= 1.0:
        return boxes
    t = torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32))
    rank_scores = torch.arange(len(t), 0, -1, dtype=torch.float32)
    keep = nms(t, rank_scores, iou).sort().values
    return boxes[keep.numpy()]
