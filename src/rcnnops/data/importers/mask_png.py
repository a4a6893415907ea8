"""Instance-mask PNG import: an images folder + ``<stem>.png`` masks -> COCO with RLE.

Each distinct non-zero value of a mask PNG is one instance; classes come from
one ``--class-name`` or from per-class subfolders ``masks/<class>/``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from rcnnops.data.importers import (
    IMAGE_EXTENSIONS,
    LIMIT_OPTION,
    MAX_IMAGE_PIXELS,
    ImportResult,
    categories,
    write_coco,
)
from rcnnops.data.io import DataError, image_size
from rcnnops.data.masks import encode, to_rle

MASK_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L")


def _list_images(images: Path) -> dict[str, Path]:
    """``stem -> path`` for the image files directly in ``images``."""
    if not images.is_dir():
        raise DataError(f"{images}: image folder not found")
    found: dict[str, Path] = {}
    for p in sorted(images.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS:
            if p.stem in found:
                raise DataError(f"{p}: image stem {p.stem!r} also used by {found[p.stem].name}")
            found[p.stem] = p
    if not found:
        raise DataError(f"{images}: no images found ({', '.join(IMAGE_EXTENSIONS)})")
    return found


def _mask_folders(masks: Path, class_name: str | None) -> dict[str, Path]:
    """``class name -> folder of <stem>.png`` masks: one class, or one per subfolder."""
    if not masks.is_dir():
        raise DataError(f"{masks}: mask folder not found")
    if class_name is not None:
        if not class_name.strip():
            raise DataError("--class-name must not be empty")
        return {class_name: masks}
    subs = {p.name: p for p in sorted(masks.iterdir()) if p.is_dir() and p.name[0] != "."}
    if not subs:
        raise DataError(
            f"{masks}: no per-class subfolders (masks/<class>/<stem>.png); "
            "give --class-name NAME for a single-class mask folder"
        )
    return subs


def read_mask(path: Path) -> np.ndarray:
    """A single-channel instance-mask PNG (modes 1, L, P, I, I;16) as ``int64 [H, W]``."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            arr = np.asarray(im) if mode in MASK_MODES else None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read mask: {e}") from None
    if arr is None:
        raise DataError(
            f"{path}: mask must be single-channel ({', '.join(MASK_MODES)}), got {mode}"
        )
    return arr.astype(np.int64)


def mask_instances(mask: np.ndarray, ignore_value: int | None) -> tuple[list[dict], int]:
    """One COCO record (RLE ``segmentation``, ``bbox`` [x, y, w, h], ``area``) per
    distinct non-zero value of ``mask`` (ascending), and how many values were ignored."""
    records, ignored = [], 0
    for value in np.unique(mask):
        if value == 0:
            continue
        if ignore_value is not None and value == ignore_value:
            ignored += 1
            continue
        seg = encode(mask == value)
        rle = to_rle(seg, mask.shape[1], mask.shape[0])
        bbox = [float(v) for v in mask_utils.toBbox(rle)]
        records.append({"segmentation": seg, "bbox": bbox, "area": float(mask_utils.area(rle))})
    return records, ignored


def _mask_files(folder: Path, suffix: str) -> dict[str, Path]:
    """``{stem: path}`` of the masks ``<stem><suffix>.png`` in ``folder`` (``.PNG``
    too); hidden files (macOS's ``._name`` AppleDouble files) are not masks."""
    end = f"{suffix}.png".lower()
    return {
        p.name[: -len(end)]: p
        for p in sorted(folder.iterdir())
        if p.name.lower().endswith(end) and not p.name.startswith(".") and p.is_file()
    }


def _orphan_masks(mask_files: list[dict[str, Path]], stems: set[str]) -> None:
    for files in mask_files:
        for stem, p in files.items():
            if stem not in stems:
                raise DataError(f"{p}: mask without an image (no {stem}.* in the image folder)")


def _add_instances(
    coco: dict,
    image_id: int,
    path: Path,
    size: tuple[int, int],
    stem: str,
    mask_files: list[dict[str, Path]],
    ignore_value: int | None,
) -> tuple[bool, int]:
    """Append the instances of image ``path`` (``size`` (w, h)), from each class folder's
    mask of ``stem`` (``mask_files``: one :func:`_mask_files` per folder), to
    ``coco["annotations"]`` (category ids 1..K in folder order). Returns whether any
    mask was found and how many values were ignored."""
    w, h = size
    found, ignored = False, 0
    for cat_id, files in enumerate(mask_files, start=1):
        mask_path = files.get(stem)
        if mask_path is None:
            continue
        found = True
        mask = read_mask(mask_path)
        if mask.shape != (h, w):
            raise DataError(
                f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                f"{path} is {w}x{h}"
            )
        records, n_ignored = mask_instances(mask, ignore_value)
        ignored += n_ignored
        for rec in records:
            ann = {"id": len(coco["annotations"]) + 1, "image_id": image_id}
            coco["annotations"].append(ann | {"category_id": cat_id, "iscrowd": 0} | rec)
    return found, ignored


def import_masks(
    images: Path,
    masks: Path,
    out: Path,
    split: str = "train",
    class_name: str | None = None,
    ignore_value: int | None = None,
    allow_missing_masks: bool = False,
    mask_suffix: str = "",
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> ImportResult:
    """Convert an images folder + instance-mask PNGs to COCO instances with RLE masks.

    ``masks/<stem><mask_suffix>.png`` belongs to image ``<stem>.<ext>``; each
    distinct non-zero value in it is one instance. With ``class_name`` every
    instance is that class; otherwise each subfolder ``masks/<class>/`` is one
    class (ids 1..K in sorted order). Instances of value ``ignore_value`` (e.g.
    255, "void") are skipped and counted. Boxes are COCO ``[x, y, w, h]`` pixels
    of the tight box around the mask. An image with no mask at all is an error
    unless ``allow_missing_masks`` (kept with no annotations, and counted).
    Images above ``max_image_pixels`` are refused.
    """
    images, masks = Path(images), Path(masks)
    files = _list_images(images)
    folders = _mask_folders(masks, class_name)
    mask_files = [_mask_files(folder, mask_suffix) for folder in folders.values()]
    _orphan_masks(mask_files, set(files))
    coco: dict = {"images": [], "annotations": [], "categories": categories(list(folders))}
    ignored = missing = 0
    for image_id, (stem, path) in enumerate(files.items(), start=1):
        where = f"{path}: image id {image_id}"
        w, h = image_size(path, where, max_image_pixels, setting=LIMIT_OPTION)
        coco["images"].append({"id": image_id, "file_name": path.name, "width": w, "height": h})
        found, n_ignored = _add_instances(
            coco, image_id, path, (w, h), stem, mask_files, ignore_value
        )
        ignored += n_ignored
        if not found:
            if not allow_missing_masks:
                searched = ", ".join(str(f) for f in folders.values())
                raise DataError(
                    f"{where}: no mask {stem}{mask_suffix}.png in {searched} "
                    "(use --allow-missing-masks to keep it without annotations)"
                )
            missing += 1
    path, changed = write_coco(coco, Path(out), split, images, max_image_pixels)
    extra = {"images without masks": missing} | changed
    if ignore_value is not None:
        extra[f"value-{ignore_value} regions ignored"] = ignored
    return ImportResult(
        path, images, len(coco["images"]), len(coco["annotations"]), len(folders), extra
    )
