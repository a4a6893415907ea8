"""``rcnnops predict``'s side: reading image files, printing and drawing detections."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path


def read_images(paths: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """``(path, base64 of the file)`` for each image; a clear error for a missing
    file or a folder."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            raise FileNotFoundError(f"{p}: is a folder; name the image files (e.g. {p}/*.jpg)")
        if not p.is_file():
            raise FileNotFoundError(f"{p}: image file not found")
        out.append((p, base64.b64encode(p.read_bytes()).decode()))
    return out


def format_detections(path: Path, det: dict) -> str:
    """One image's detections as readable lines (name, score, xyxy box)."""
    lines = [f"{path}: {len(det['boxes'])} detection(s)"]
    has_masks = bool(det.get("masks"))
    for box, name, score in zip(det["boxes"], det["names"], det["scores"], strict=True):
        coords = ", ".join(f"{v:.1f}" for v in box)
        lines.append(f"  {name:<16} {score:.3f}  [{coords}]" + ("  +mask" if has_masks else ""))
    return "\n".join(lines)


def as_records(det: dict) -> list[dict]:
    """Detections (xyxy, label ids) as COCO result records (xywh) for drawing."""
    records = []
    masks = det.get("masks") or [None] * len(det["boxes"])
    for box, label, score, mask in zip(
        det["boxes"], det["labels"], det["scores"], masks, strict=True
    ):
        x1, y1, x2, y2 = box
        r = {"bbox": [x1, y1, x2 - x1, y2 - y1], "category_id": label, "score": score}
        if mask is not None:
            r["segmentation"] = mask
        records.append(r)
    return records


MAX_DRAWN_SIDE = 2048  # pixels: a 50 M-pixel photo drawn at twice its size took 5 GB


def drawing_names(paths: Sequence[Path]) -> list[str]:
    """``<stem>.png`` per image; a stem met again gets ``-2``, ``-3``... (photo.jpg
    and photo.png, or two folders' 001.jpg, each keep their drawing)."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        seen[p.stem] = seen.get(p.stem, 0) + 1
        names.append(f"{p.stem}.png" if seen[p.stem] == 1 else f"{p.stem}-{seen[p.stem]}.png")
    return names


def draw(image_path: Path, det: dict, out: Path) -> Path:
    """``out`` (a PNG): the image with its detections (boxes, labels, masks), small
    images at twice their size (readable labels), large ones at most
    :data:`MAX_DRAWN_SIDE` pixels on their longer side."""
    from rcnnops.data.io import load_image_array
    from rcnnops.plots import draw_detections, pyplot, save_figure

    image = load_image_array(image_path)
    h, w = image.shape[:2]
    k = min(2.0, MAX_DRAWN_SIDE / max(w, h, 64))
    fig = pyplot().figure(figsize=(max(w, 64) * k / 100, max(h, 64) * k / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    names = dict(zip(det["labels"], det["names"], strict=True))
    draw_detections(ax, image, as_records(det), names, max_side=MAX_DRAWN_SIDE)
    return save_figure(fig, out)
