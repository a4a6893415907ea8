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


def draw(image_path: Path, det: dict, out_dir: Path) -> Path:
    """``out_dir/<stem>.png``: the image with its detections (boxes, labels, masks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rcnnops.data.io import load_image_array
    from rcnnops.plots import draw_detections

    image = load_image_array(image_path)
    h, w = image.shape[:2]
    fig = plt.figure(figsize=(max(w, 64) / 50, max(h, 64) / 50), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    names = dict(zip(det["labels"], det["names"], strict=True))
    draw_detections(ax, image, as_records(det), names)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{image_path.stem}.png"
    fig.savefig(out)
    plt.close(fig)
    return out
