"""COCO instances datasets: reading, validation, labels and the torch Dataset.

Boxes are converted from COCO ``[x, y, w, h]`` to ``(x1, y1, x2, y2)`` absolute
pixels here, at the boundary; everything else uses xyxy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

REQUIRED_KEYS = ("images", "annotations", "categories")


class DataError(ValueError):
    """Invalid dataset input. The message names the file and the record."""


def read_json(path: Path) -> Any:
    """Parse a JSON file, turning any failure into a :class:`DataError` naming it."""
    try:
        text = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None


def safe_image_path(root: Path, file_name: Any, where: str) -> Path:
    """Resolve ``file_name`` under ``root``; refuse names that escape it.

    Absolute paths, ``..`` components and symlinks pointing outside ``root``
    are all refused (a dataset must not read arbitrary files).
    """
    if not isinstance(file_name, str) or not file_name.strip():
        raise DataError(f"{where}: 'file_name' must be a non-empty string, got {file_name!r}")
    rel = Path(file_name)
    if rel.is_absolute() or ".." in rel.parts:
        raise DataError(f"{where}: file_name {file_name!r} escapes the image folder {root}")
    root_resolved = root.resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root_resolved):
        raise DataError(
            f"{where}: file_name {file_name!r} resolves outside the image folder {root} "
            f"(symlink to {path})"
        )
    return path


def load_image_array(path: Path) -> np.ndarray:
    """Read an image as ``uint8 [H, W, 3]`` RGB (EXIF-rotated; grey, CMYK,
    palette and 16-bit images converted). Errors name the file."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit greyscale: scale to 8 bit before RGB conversion.
                arr16 = np.asarray(im, dtype=np.float32)
                peak = 65535.0 if arr16.max() > 255 else 255.0
                grey = np.clip(arr16 / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read image: {e}") from None


def load_image(path: Path) -> torch.Tensor:
    """Read an image as ``float32 [3, H, W]`` in [0, 1] (see :func:`load_image_array`)."""
    return torch.from_numpy(load_image_array(path)).permute(2, 0, 1).float().div_(255.0)


def _image_size(path: Path, where: str) -> tuple[int, int]:
    """(width, height) after EXIF rotation, reading only the header."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except FileNotFoundError:
        raise DataError(f"{where}: image {path} not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{where}: image {path} is unreadable: {e}") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


@dataclass
class ValidationReport:
    """What validation did: counts only, for logs and the prepare report."""

    images: int = 0
    annotations: int = 0
    crowd: int = 0
    clipped: int = 0
    dropped_degenerate: int = 0
    dropped_ids: list[int] = field(default_factory=list)


def _int_id(rec: Any, key: str, where: str) -> int:
    v = rec.get(key) if isinstance(rec, dict) else None
    if isinstance(v, bool) or not isinstance(v, int):
        raise DataError(f"{where}: '{key}' must be an integer, got {v!r}")
    return v


def _check_categories(coco: dict, src: Path) -> dict[int, str]:
    cats: dict[int, str] = {}
    for i, c in enumerate(coco["categories"]):
        where = f"{src}: categories[{i}]"
        if not isinstance(c, dict):
            raise DataError(f"{where}: expected an object, got {c!r}")
        cid = _int_id(c, "id", where)
        if cid in cats:
            raise DataError(f"{src}: category id {cid}: duplicate category id")
        name = c.get("name")
        if not isinstance(name, str) or not name:
            raise DataError(f"{src}: category id {cid}: 'name' must be a non-empty string")
        cats[cid] = name
    if not cats:
        raise DataError(f"{src}: 'categories' is empty: at least one category is needed")
    return cats


def _check_images(
    coco: dict, src: Path, image_root: Path, check_files: bool
) -> dict[int, tuple[int, int]]:
    sizes: dict[int, tuple[int, int]] = {}
    for i, im in enumerate(coco["images"]):
        if not isinstance(im, dict):
            raise DataError(f"{src}: images[{i}]: expected an object, got {im!r}")
        iid = _int_id(im, "id", f"{src}: images[{i}]")
        where = f"{src}: image id {iid}"
        if iid in sizes:
            raise DataError(f"{where}: duplicate image id")
        w, h = im.get("width"), im.get("height")
        for k, v in (("width", w), ("height", h)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise DataError(f"{where}: '{k}' must be a positive integer, got {v!r}")
        path = safe_image_path(image_root, im.get("file_name"), where)
        if check_files:
            if not path.is_file():
                raise DataError(f"{where}: image file {path} not found")
            actual = _image_size(path, where)
            if actual != (w, h):
                raise DataError(
                    f"{where}: {path} is {actual[0]}x{actual[1]} but the annotation says {w}x{h}"
                )
        sizes[iid] = (w, h)
    return sizes


def validate_coco(
    coco: Any,
    src: Path,
    image_root: Path,
    *,
    check_files: bool = True,
    drop_degenerate: bool = False,
    box_tolerance: float = 1.0,
) -> tuple[dict, ValidationReport]:
    """Validate a COCO instances dict; return a cleaned copy and a report.

    Raises :class:`DataError` naming ``src`` and the offending record on the
    first problem. Boxes overhanging the image by at most ``box_tolerance``
    pixels are clipped (and counted); zero-size boxes are errors unless
    ``drop_degenerate``, which drops and counts them. Segmentations (polygons
    or RLE), when present, must be well-formed and fit the image.
    """
    from rcnnops.data.masks import check_segmentation

    if not isinstance(coco, dict):
        raise DataError(f"{src}: expected a JSON object with {list(REQUIRED_KEYS)}")
    for key in REQUIRED_KEYS:
        if key not in coco:
            raise DataError(f"{src}: missing required key '{key}'")
        if not isinstance(coco[key], list):
            raise DataError(f"{src}: '{key}' must be a list")
    cats = _check_categories(coco, src)
    sizes = _check_images(coco, src, image_root, check_files)
    report = ValidationReport(images=len(sizes))
    anns, seen = [], set()
    for i, a in enumerate(coco["annotations"]):
        if not isinstance(a, dict):
            raise DataError(f"{src}: annotations[{i}]: expected an object, got {a!r}")
        aid = _int_id(a, "id", f"{src}: annotations[{i}]")
        where = f"{src}: annotation id {aid}"
        if aid in seen:
            raise DataError(f"{where}: duplicate annotation id")
        seen.add(aid)
        iid = _int_id(a, "image_id", where)
        if iid not in sizes:
            raise DataError(f"{where}: image_id {iid} is not in 'images'")
        cid = _int_id(a, "category_id", where)
        if cid not in cats:
            raise DataError(f"{where}: unknown category_id {cid} (known: {sorted(cats)})")
        crowd = a.get("iscrowd", 0)
        if crowd not in (0, 1) or isinstance(crowd, bool):
            raise DataError(f"{where}: 'iscrowd' must be 0 or 1, got {crowd!r}")
        bbox = a.get("bbox")
        if (
            not isinstance(bbox, list)
            or len(bbox) != 4
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)
            or not all(math.isfinite(v) for v in bbox)
        ):
            raise DataError(f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h], got {bbox!r}")
        x, y, bw, bh = (float(v) for v in bbox)
        if bw <= 0 or bh <= 0:
            if drop_degenerate:
                report.dropped_degenerate += 1
                report.dropped_ids.append(aid)
                continue
            raise DataError(
                f"{where}: bbox {bbox} has zero or negative size (width {bw}, height {bh}); "
                "set prepare.drop_degenerate: true to drop such boxes"
            )
        w, h = sizes[iid]
        t = box_tolerance
        if x < -t or y < -t or x + bw > w + t or y + bh > h + t:
            raise DataError(f"{where}: bbox {bbox} lies outside image id {iid} ({w}x{h})")
        x1, y1 = max(0.0, x), max(0.0, y)
        x2, y2 = min(float(w), x + bw), min(float(h), y + bh)
        out = dict(a, iscrowd=crowd)
        if (x1, y1, x2, y2) != (x, y, x + bw, y + bh):
            report.clipped += 1
            out["bbox"] = [x1, y1, x2 - x1, y2 - y1]
        if "area" not in out:
            out["area"] = (x2 - x1) * (y2 - y1)
        seg = a.get("segmentation")
        if seg not in (None, []):  # [] or absent: a box-only annotation
            check_segmentation(seg, w, h, where, box_tolerance)
        report.crowd += crowd
        anns.append(out)
    report.annotations = len(anns)
    cleaned = {k: v for k, v in coco.items() if k != "annotations"}
    cleaned["annotations"] = anns
    return cleaned, report


@dataclass(frozen=True)
class LabelMap:
    """COCO category ids <-> contiguous labels 1..K (0 is background)."""

    category_ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_categories(cls, categories: list[dict]) -> LabelMap:
        cats = sorted(categories, key=lambda c: c["id"])
        return cls(tuple(c["id"] for c in cats), tuple(c["name"] for c in cats))

    @property
    def num_classes(self) -> int:
        """Number of object classes K (the models add 1 for background)."""
        return len(self.category_ids)

    def label(self, category_id: int) -> int:
        return self.category_ids.index(category_id) + 1

    def category_id(self, label: int) -> int:
        return self.category_ids[label - 1]

    def name(self, label: int) -> str:
        return self.names[label - 1]

    def to_json(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "labels": [
                {"label": i + 1, "category_id": c, "name": n}
                for i, (c, n) in enumerate(zip(self.category_ids, self.names, strict=True))
            ],
        }

    @classmethod
    def from_json(cls, data: dict) -> LabelMap:
        rows = sorted(data["labels"], key=lambda r: r["label"])
        return cls(tuple(r["category_id"] for r in rows), tuple(r["name"] for r in rows))


class CocoDetection(Dataset):
    """A prepared COCO split as ``(image [3, H, W] in [0, 1], target)`` samples.

    ``target`` holds ``boxes`` float32 ``[N, 4]`` xyxy pixels, ``labels`` int64
    1..K, ``image_id`` (the COCO id), ``iscrowd`` int64 ``[N]`` and ``area``.
    Crowd regions are dropped when ``skip_crowd`` (torchvision detectors do not
    model them; COCOeval handles them from the ground-truth file).
    ``proposals(image_id) -> Tensor[N, 4]`` (xyxy, this image's frame), when
    given, adds ``target["proposals"]`` before ``transform``, which maps
    ``(image, target) -> (image, target)`` and so moves them with the image.
    ``masks=True`` adds ``target["masks"]`` uint8 ``[N, H, W]`` decoded from the
    annotations' polygons or RLE (every non-crowd annotation needs one).
    """

    def __init__(
        self,
        coco: dict,
        image_root: Path,
        labels: LabelMap,
        transform: Any = None,
        skip_crowd: bool = True,
        proposals: Any = None,
        masks: bool = False,
    ) -> None:
        self.image_root = Path(image_root)
        self.masks = masks
        self.labels = labels
        self.transform = transform
        self.proposals = proposals
        self.images = sorted(coco["images"], key=lambda im: im["id"])
        by_image: dict[int, list[dict]] = {im["id"]: [] for im in self.images}
        for a in coco["annotations"]:
            if skip_crowd and a.get("iscrowd", 0):
                continue
            by_image[a["image_id"]].append(a)
        self.anns = by_image
        if masks:
            missing = [
                a["id"] for anns in by_image.values() for a in anns if not a.get("segmentation")
            ]
            if missing:
                raise DataError(
                    f"{len(missing)} annotation(s) have no 'segmentation' (first ids: "
                    f"{missing[:5]}); mask variants need an instance mask for every object"
                )

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> Path:
        im = self.images[index]
        return safe_image_path(self.image_root, im["file_name"], f"image id {im['id']}")

    def gt_boxes(self, index: int) -> torch.Tensor:
        """Ground-truth boxes ``[N, 4]`` xyxy of one image, without reading its pixels."""
        anns = self.anns[self.images[index]["id"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        return boxes

    def gt_masks(self, index: int) -> torch.Tensor:
        """Instance masks ``uint8 [N, H, W]`` of one image, in annotation order."""
        from rcnnops.data.masks import decode

        im = self.images[index]
        w, h = im["width"], im["height"]
        masks = [decode(a["segmentation"], w, h) for a in self.anns[im["id"]]]
        if not masks:
            return torch.zeros((0, h, w), dtype=torch.uint8)
        return torch.from_numpy(np.stack(masks))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        im = self.images[index]
        path = self.image_path(index)
        image = load_image(path)
        if tuple(image.shape[1:]) != (im["height"], im["width"]):
            raise DataError(
                f"{path}: image is {image.shape[2]}x{image.shape[1]} but its record "
                f"(image id {im['id']}) says {im['width']}x{im['height']}"
            )
        anns = self.anns[im["id"]]
        target = {
            "boxes": self.gt_boxes(index),
            "labels": torch.tensor(
                [self.labels.label(a["category_id"]) for a in anns], dtype=torch.int64
            ),
            "image_id": torch.tensor(im["id"], dtype=torch.int64),
            "iscrowd": torch.tensor([a.get("iscrowd", 0) for a in anns], dtype=torch.int64),
            "area": torch.tensor([float(a["area"]) for a in anns], dtype=torch.float32),
        }
        if self.masks:
            target["masks"] = self.gt_masks(index)
        if self.proposals is not None:
            target["proposals"] = self.proposals(im["id"])
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


def collate(batch: list) -> tuple[list, list]:
    """Detection batches are lists (images differ in size)."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
