"""The embedded default dataset: "shapes", generated deterministically as COCO.

Each image has a textured, cluttered background (a colour gradient, noise,
thin random lines and faint blobs) and 0..``max_objects`` filled shapes of
several classes with varied sizes, colours and partial overlaps. Masks are
the *visible* part of each shape (later shapes occlude earlier ones), written
as COCO polygons traced from the rendered mask; boxes and areas come from the
same visible mask, so the annotations agree with the pixels exactly.

Everything downstream reads COCO only: this module is one producer of it.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from rcnnops.config import GenerateParams
from rcnnops.files import replaced_dir

SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "star")

# A shape must keep at least this share of its pixels visible after
# occlusion, so every annotated object is recognisable.
MIN_VISIBLE = 0.85


def _polygon(kind: str, cx: float, cy: float, size: float, angle: float) -> np.ndarray:
    """Vertices ``[K, 2]`` (x, y) of a shape of outer diameter ``size``."""
    r = size / 2.0
    if kind == "circle":
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        radii = np.full_like(t, r)
    elif kind == "square":
        t = np.array([0.25, 0.75, 1.25, 1.75]) * math.pi + angle
        radii = np.full_like(t, r)
    elif kind == "triangle":
        t = np.array([0.5, 0.5 + 2 / 3, 0.5 + 4 / 3]) * math.pi + angle
        radii = np.full_like(t, r)
    elif kind == "diamond":
        t = np.array([0.0, 0.5, 1.0, 1.5]) * math.pi + angle
        radii = np.array([r, 0.6 * r, r, 0.6 * r])
    elif kind == "hexagon":
        t = np.arange(6) * math.pi / 3 + angle
        radii = np.full_like(t, r)
    elif kind == "star":
        t = np.arange(10) * math.pi / 5 + angle
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    else:
        raise ValueError(f"unknown shape class {kind!r}; known: {SHAPES}")
    return np.stack([cx + radii * np.cos(t), cy - radii * np.sin(t)], axis=1)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured, cluttered RGB background ``uint8 [size, size, 3]``."""
    c0, c1 = rng.uniform(40, 215, size=(2, 3))
    ramp = (
        np.linspace(0.0, 1.0, size)[:, None]
        if rng.random() < 0.5
        else np.linspace(0.0, 1.0, size)[None, :]
    )
    img = c0 + (c1 - c0) * ramp[..., None]
    img = img + rng.normal(0, rng.uniform(4, 14), size=(size, size, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(2, 7))):  # clutter: thin lines
        p = rng.integers(0, size, size=4)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        cv2.line(img, (int(p[0]), int(p[1])), (int(p[2]), int(p[3])), colour, 1)
    for _ in range(int(rng.integers(0, 4))):  # clutter: faint blobs
        centre = tuple(int(c) for c in rng.integers(0, size, size=2))
        axes = tuple(int(a) for a in rng.integers(3, max(4, size // 10), size=2))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        overlay = img.copy()
        cv2.ellipse(overlay, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
        img = cv2.addWeighted(overlay, 0.35, img, 0.65, 0)
    return img


def _mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons (flat ``[x1, y1, ...]``) whose rasterisation is ``mask``.

    Contours through boundary pixel centres would shave half a pixel off every
    edge and drop one-pixel tips; tracing the mask upsampled 2x puts the
    outline a quarter pixel inside the true edges, so every pixel centre of
    the mask (and no other) lies inside it.
    """
    up = np.kron(mask, np.ones((2, 2), np.uint8))
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = []
    for c in contours:
        if len(c) < 3:
            continue
        polys.append([round((float(v) + 0.5) / 2.0, 2) for v in c.reshape(-1)])
    return polys


def _visible_ok(visible: np.ndarray, full_area: int) -> bool:
    """Mostly visible and in one piece (so one polygon describes it exactly)."""
    if visible.sum() < MIN_VISIBLE * full_area:
        return False
    n, _ = cv2.connectedComponents(visible.astype(np.uint8), connectivity=4)
    return n == 2  # background + one region


def render_image(
    rng: np.random.Generator, p: GenerateParams, empty: bool
) -> tuple[np.ndarray, list[dict]]:
    """One image ``uint8 [H, W, 3]`` and its objects (class index, visible mask)."""
    size = p.image_size
    img = _background(rng, size)
    objects: list[dict] = []
    n = 0 if empty else int(rng.integers(1, p.max_objects + 1))
    owner = np.full((size, size), -1, dtype=np.int32)  # which object each pixel shows
    for _ in range(n * 10):  # bounded retries for placements that hide too much
        if len(objects) == n:
            break
        cls = int(rng.integers(0, len(p.classes)))
        s = float(rng.uniform(p.min_object_size, p.max_object_size))
        cx, cy = rng.uniform(s / 2, size - s / 2, size=2)
        angle = math.radians(float(rng.uniform(-p.max_rotation, p.max_rotation)))
        poly = _polygon(p.classes[cls], cx, cy, s, angle)
        shape_mask = np.zeros((size, size), np.uint8)
        cv2.fillPoly(shape_mask, [np.round(poly).astype(np.int32)], 1)
        new_owner = np.where(shape_mask > 0, len(objects), owner)
        # Accept only if every object (old ones included) stays mostly visible.
        areas = [o["full_area"] for o in objects] + [int(shape_mask.sum())]
        if areas[-1] == 0:
            continue
        if not all(_visible_ok(new_owner == i, a) for i, a in enumerate(areas)):
            continue
        owner = new_owner
        colour = rng.integers(0, 256, size=3)
        while np.abs(colour.astype(int) - img[int(cy), int(cx)].astype(int)).sum() < 120:
            colour = rng.integers(0, 256, size=3)  # keep shapes distinguishable
        img[shape_mask > 0] = colour.astype(np.uint8)
        objects.append({"cls": cls, "full_area": areas[-1]})
    for i, o in enumerate(objects):
        o["mask"] = (owner == i).astype(np.uint8)
    return img, objects


def _annotation(obj: dict, ann_id: int, image_id: int, cat_ids: list[int]) -> dict:
    ys, xs = np.nonzero(obj["mask"])
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cat_ids[obj["cls"]],
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "area": int(obj["mask"].sum()),
        "segmentation": _mask_to_polygons(obj["mask"]),
        "iscrowd": 0,
    }


class _RecordList:
    """One JSON array written as its records come, as ``json.dumps`` would write it
    inside the whole document (``[a, b]``)."""

    def __init__(self, f) -> None:
        self.f, self.count = f, 0

    def add(self, record: dict) -> None:
        self.f.write(("[" if self.count == 0 else ", ") + json.dumps(record))
        self.count += 1

    def close(self) -> None:
        self.f.write("[]" if self.count == 0 else "]")


def generate_split(
    p: GenerateParams, split: str, num: int, seed: int, out: Path, first_id: int = 1
) -> tuple[int, int]:
    """Write ``num`` images to ``out/<split>/`` and their COCO file to
    ``out/annotations/instances_<split>.json``; returns (images, annotations).

    Records go to the file as they are made (the annotations through a spool file
    beside it, since COCO lists them after the images), so memory stays flat
    however many images there are; the file is byte for byte what ``json.dumps``
    of the whole COCO dict writes."""
    rng = np.random.default_rng(seed)
    (out / split).mkdir(parents=True, exist_ok=True)
    cat_ids = list(range(1, len(p.classes) + 1))
    info = {"description": f"rcnnops shapes ({split})", "version": "1"}
    categories = [
        {"id": cid, "name": name, "supercategory": "shape"}
        for cid, name in zip(cat_ids, p.classes, strict=True)
    ]
    path = out / "annotations" / f"instances_{split}.json"
    spool = path.with_name(path.name + ".annotations")
    with open(path, "w") as f, open(spool, "w+") as spooled:
        f.write(f'{{"info": {json.dumps(info)}, "licenses": [], "images": ')
        images, annotations = _RecordList(f), _RecordList(spooled)
        ann_id = first_id
        for k in tqdm(range(num), desc=f"generate {split}", unit="img", leave=False):
            image_id = first_id + k
            img, objects = render_image(rng, p, empty=rng.random() < p.empty_fraction)
            name = f"{image_id:06d}.png"
            cv2.imwrite(str(out / split / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            images.add(
                {"id": image_id, "file_name": name, "width": p.image_size, "height": p.image_size}
            )
            for obj in objects:
                annotations.add(_annotation(obj, ann_id, image_id, cat_ids))
                ann_id += 1
        images.close()
        annotations.close()
        f.write(', "annotations": ')
        spooled.seek(0)
        shutil.copyfileobj(spooled, f)
        f.write(f', "categories": {json.dumps(categories)}}}')
    spool.unlink()
    return images.count, annotations.count


def generate(p: GenerateParams) -> Path:
    """Generate train and val splits under ``p.out`` atomically; returns ``p.out``."""
    out = Path(p.out)
    with replaced_dir(out, ".generate-") as tmp:
        (tmp / "annotations").mkdir()
        # Separate seeds per split; val ids follow train ids so ids never clash.
        splits = {
            "train": (p.num_train, p.seed * 2 + 0, 1),
            "val": (p.num_val, p.seed * 2 + 1, 1 + p.num_train),
        }
        for split, (num, seed, first) in splits.items():
            generate_split(p, split, num, seed, tmp, first_id=first)
    return out
