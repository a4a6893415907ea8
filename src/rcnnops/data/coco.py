"""COCO instances datasets: reading, validation, labels and the torch Dataset.

Boxes are converted from COCO ``[x, y, w, h]`` to ``(x1, y1, x2, y2)`` absolute
pixels here, at the boundary; everything else uses xyxy.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

REQUIRED_KEYS = ("images", "annotations", "categories")
# Ids become int64 tensors and numpy arrays (pycocotools): they must fit.
MAX_ID = 2**63 - 1
# Images above this many pixels are refused (``prepare.max_image_pixels``).
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000


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
    except RecursionError:
        raise DataError(f"{path}: not valid JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int too long
        raise DataError(f"{path}: not valid JSON: {e}") from None


def safe_image_path(root: Path, file_name: Any, where: str) -> Path:
    """Resolve ``file_name`` under ``root``; refuse names that escape it.

    Absolute paths, ``..`` components and symlinks pointing outside ``root``
    are all refused (a dataset must not read arbitrary files).
    """
    if not isinstance(file_name, str) or not file_name.strip():
        raise DataError(f"{where}: 'file_name' must be a non-empty string, got {_short(file_name)}")
    bad = "it contains a NUL character" if "\0" in file_name else None
    try:
        os.fsencode(file_name)
    except UnicodeEncodeError as e:  # e.g. a lone surrogate: no file can have this name
        bad = e.reason
    if bad:
        raise DataError(f"{where}: file_name {_short(file_name)} is not a valid path: {bad}")
    rel = Path(file_name)
    if rel.is_absolute() or ".." in rel.parts:
        raise DataError(f"{where}: file_name {_short(file_name)} escapes the image folder {root}")
    try:
        root_resolved = Path(root).resolve()
        path = (Path(root) / rel).resolve()
    except (OSError, RuntimeError) as e:  # name too long, symlink loop
        raise DataError(f"{where}: file_name {_short(file_name)} cannot be resolved: {e}") from None
    if not path.is_relative_to(root_resolved):
        raise DataError(
            f"{where}: file_name {_short(file_name)} resolves outside the image folder {root} "
            f"(symlink to {path})"
        )
    return path


def load_image_array(path: Path) -> np.ndarray:
    """Read an image as ``uint8 [H, W, 3]`` RGB (EXIF-rotated; grey, CMYK,
    palette and 16-bit images converted). Errors name the file."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                # 16-bit (or int/float) greyscale: scale to 8 bit before RGB conversion.
                arr16 = np.asarray(im, dtype=np.float32)
                peak = 65535.0 if arr16.size and arr16.max() > 255 else 255.0
                grey = np.clip(arr16 / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: cannot read image: too many pixels: {e}") from None
    except Exception as e:  # Pillow raises many types for damaged files
        raise DataError(f"{path}: cannot read image: {_reason(e)}") from None


def _reason(e: Exception) -> str:
    return str(e) or type(e).__name__


def load_image(path: Path) -> torch.Tensor:
    """Read an image as ``float32 [3, H, W]`` in [0, 1] (see :func:`load_image_array`)."""
    return torch.from_numpy(load_image_array(path)).permute(2, 0, 1).float().div_(255.0)


def _image_size(
    path: Path, where: str, max_pixels: int | None = None, decode: bool = False
) -> tuple[int, int]:
    """(width, height) after EXIF rotation, reading only the header; with
    ``decode`` also every pixel (at reduced scale where the format allows), so a
    truncated or corrupt file fails here, not mid-training. Images of more than
    ``max_pixels`` are refused before any decoding."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                raise DataError(
                    f"{where}: image {path} is {w}x{h} = {w * h} pixels, above the limit of "
                    f"{max_pixels} (raise prepare.max_image_pixels in params.yaml to accept it)"
                )
            orientation = im.getexif().get(0x0112, 1)
            if decode:
                im.draft("RGB", (max(1, w // 8), max(1, h // 8)))  # JPEG: decode at 1/8 scale
                im.load()
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{where}: image {path} not found") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"{where}: image {path} is unreadable: too many pixels: {e}") from None
    except Exception as e:  # Pillow raises many types for damaged files
        raise DataError(f"{where}: image {path} is unreadable: {_reason(e)}") from None
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


def _int_id(rec: Any, key: str, where: str, low: int = 0) -> int:
    """An id in ``[low, 2**63)``: ids become int64 tensors and numpy arrays."""
    v = rec.get(key) if isinstance(rec, dict) else None
    if isinstance(v, bool) or not isinstance(v, int):
        raise DataError(f"{where}: '{key}' must be an integer, got {_short(v)}")
    if not low <= v <= MAX_ID:
        raise DataError(f"{where}: '{key}' must be an integer in [{low}, 2**63), got {_short(v)}")
    return v


def _short(v: Any, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters (a bad record can be huge)."""
    try:
        text = repr(v)
    except ValueError:  # an int too long to print
        text = f"<{type(v).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _has_size(lo: float, hi: float) -> bool:
    """Whether ``[lo, lo + (hi - lo)]`` keeps a positive extent in float32, as the
    dataset computes xyxy boxes (torchvision refuses boxes without one)."""
    if not hi > lo:
        return False
    start = np.float32(lo)
    return bool(start + np.float32(hi - lo) > start)


def finite_floats(values: Any, n: int | None = None) -> list[float] | None:
    """``values`` as floats if it is a list of (``n``) finite real numbers, else None.

    JSON booleans are not numbers here; ints too large for a float are not finite."""
    if not isinstance(values, list) or (n is not None and len(values) != n):
        return None
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float):
            return None
        try:
            f = float(v)
        except OverflowError:
            return None
        if not math.isfinite(f):
            return None
        out.append(f)
    return out


def _check_categories(coco: dict, src: Path) -> dict[int, str]:
    cats: dict[int, str] = {}
    for i, c in enumerate(coco["categories"]):
        where = f"{src}: categories[{i}]"
        if not isinstance(c, dict):
            raise DataError(f"{where}: expected an object, got {_short(c)}")
        cid = _int_id(c, "id", where)
        if cid in cats:
            raise DataError(f"{src}: category id {cid}: duplicate category id")
        name = c.get("name")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{src}: category id {cid}: 'name' must be a non-empty string")
        cats[cid] = name
    if not cats:
        raise DataError(f"{src}: 'categories' is empty: at least one category is needed")
    return cats


def _check_images(
    coco: dict, src: Path, image_root: Path, check_files: bool, max_pixels: int
) -> dict[int, tuple[int, int]]:
    sizes: dict[int, tuple[int, int]] = {}
    for i, im in enumerate(coco["images"]):
        if not isinstance(im, dict):
            raise DataError(f"{src}: images[{i}]: expected an object, got {_short(im)}")
        iid = _int_id(im, "id", f"{src}: images[{i}]")
        where = f"{src}: image id {iid}"
        if iid in sizes:
            raise DataError(f"{where}: duplicate image id")
        w, h = im.get("width"), im.get("height")
        for k, v in (("width", w), ("height", h)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise DataError(f"{where}: '{k}' must be a positive integer, got {_short(v)}")
        if w * h > max_pixels:  # masks of this size would be allocated later
            raise DataError(
                f"{where}: {w}x{h} = {w * h} pixels is above the limit of {max_pixels} "
                "(raise prepare.max_image_pixels in params.yaml to accept it)"
            )
        path = safe_image_path(image_root, im.get("file_name"), where)
        if check_files:
            try:
                found = path.is_file()
            except OSError as e:  # e.g. a name too long for the file system
                raise DataError(f"{where}: image file {_short(str(path))}: {e.strerror}") from None
            if not found:
                raise DataError(f"{where}: image file {path} not found")
            actual = _image_size(path, where, max_pixels, decode=True)
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
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[dict, ValidationReport]:
    """Validate a COCO instances dict; return a cleaned copy and a report.

    Raises :class:`DataError` naming ``src`` and the offending record on the
    first problem. Boxes overhanging the image by at most ``box_tolerance``
    pixels are clipped (and counted); zero-size boxes are errors unless
    ``drop_degenerate``, which drops and counts them. Segmentations (polygons
    or RLE), when present, must be well-formed and fit the image. With
    ``check_files`` every image is decoded once (a damaged file fails here)
    and images above ``max_image_pixels`` are refused.
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
    sizes = _check_images(coco, src, image_root, check_files, max_image_pixels)
    report = ValidationReport(images=len(sizes))
    anns, seen = [], set()
    for i, a in enumerate(coco["annotations"]):
        if not isinstance(a, dict):
            raise DataError(f"{src}: annotations[{i}]: expected an object, got {_short(a)}")
        # pycocotools' COCOeval reads a matched ground-truth id of 0 as "no match".
        aid = _int_id(a, "id", f"{src}: annotations[{i}]", low=1)
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
        if isinstance(crowd, bool) or not isinstance(crowd, int) or crowd not in (0, 1):
            raise DataError(f"{where}: 'iscrowd' must be 0 or 1, got {_short(crowd)}")
        bbox = a.get("bbox")
        floats = finite_floats(bbox, 4)
        if floats is None:
            raise DataError(
                f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h], got {_short(bbox)}"
            )
        x, y, bw, bh = floats
        w, h = sizes[iid]
        t = box_tolerance
        if bw > 0 and bh > 0 and (x < -t or y < -t or x + bw > w + t or y + bh > h + t):
            raise DataError(f"{where}: bbox {_short(bbox)} lies outside image id {iid} ({w}x{h})")
        x1, y1 = max(0.0, x), max(0.0, y)
        x2, y2 = min(float(w), x + bw), min(float(h), y + bh)
        if not (_has_size(x1, x2) and _has_size(y1, y2)):
            if drop_degenerate:
                report.dropped_degenerate += 1
                report.dropped_ids.append(aid)
                continue
            raise DataError(
                f"{where}: bbox {bbox} has zero or negative size (width {bw}, height {bh}"
                f"{', once clipped to the image' if bw > 0 and bh > 0 else ''}); "
                "set prepare.drop_degenerate: true to drop such boxes"
            )
        out = dict(a, iscrowd=crowd)
        if (x1, y1, x2, y2) != (x, y, x + bw, y + bh):
            report.clipped += 1
            out["bbox"] = [x1, y1, x2 - x1, y2 - y1]
        if "area" not in out:
            out["area"] = (x2 - x1) * (y2 - y1)
        else:  # COCOeval's area ranges use it: a number the image can hold
            area = finite_floats([out["area"]], 1)
            most = (w + 2 * t) * (h + 2 * t)
            if area is None or not 0 <= area[0] <= most:
                raise DataError(
                    f"{where}: 'area' must be a number in [0, {most:g}] (the image's "
                    f"pixels), got {_short(out['area'])}"
                )
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
