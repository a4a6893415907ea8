"""Validation of COCO instances files: the gate every dataset passes before use.

The first problem raises :class:`~rcnnops.data.io.DataError` naming the file
and the record. Boxes stay COCO ``[x, y, w, h]`` pixels here; the few fixes
validation makes (clipping within tolerance, dropping degenerate boxes) are
counted in a :class:`ValidationReport`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rcnnops.data.checks import finite_floats, has_size, int_id
from rcnnops.data.io import (
    DEFAULT_MAX_IMAGE_PIXELS,
    PARAMS_LIMIT,
    DataError,
    image_size,
    safe_image_path,
    short,
    stored_size,
)
from rcnnops.data.masks import check_segmentation

REQUIRED_KEYS = ("images", "annotations", "categories")


@dataclass
class ValidationReport:
    """What validation did: counts only, for logs and the prepare report."""

    images: int = 0
    annotations: int = 0
    crowd: int = 0
    clipped: int = 0
    dropped_degenerate: int = 0
    dropped_ids: list[int] = field(default_factory=list)
    # box-only annotations written as ``"segmentation": [[]]`` (as several
    # converters do), read as ``[]``
    empty_polygons: int = 0


def _check_categories(coco: dict, src: Path) -> dict[int, str]:
    cats: dict[int, str] = {}
    for i, c in enumerate(coco["categories"]):
        where = f"{src}: categories[{i}]"
        if not isinstance(c, dict):
            raise DataError(f"{where}: expected an object, got {short(c)}")
        cid = int_id(c, "id", where)
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
    coco: dict,
    src: Path,
    image_root: Path,
    check_files: bool,
    max_pixels: int,
    setting: str,
) -> dict[int, tuple[int, int]]:
    sizes: dict[int, tuple[int, int]] = {}
    files: dict[Path, int] = {}  # resolved image file -> the first image id naming it
    for i, im in enumerate(coco["images"]):
        if not isinstance(im, dict):
            raise DataError(f"{src}: images[{i}]: expected an object, got {short(im)}")
        iid = int_id(im, "id", f"{src}: images[{i}]")
        where = f"{src}: image id {iid}"
        if iid in sizes:
            raise DataError(f"{where}: duplicate image id")
        w, h = im.get("width"), im.get("height")
        for k, v in (("width", w), ("height", h)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise DataError(f"{where}: '{k}' must be a positive integer, got {short(v)}")
        if w * h > max_pixels:  # masks of this size would be allocated later
            raise DataError(
                f"{where}: {w}x{h} = {w * h} pixels is above the limit of {max_pixels} "
                f"(raise {setting} to accept it)"
            )
        path = safe_image_path(image_root, im.get("file_name"), where)
        if (first := files.setdefault(path, iid)) != iid:
            raise DataError(
                f"{where}: file_name {short(im['file_name'])} is image id {first}'s file "
                "too; a photo listed as two images is counted twice and, split by "
                "val_fraction, can land in train and val both: list it once, with all "
                "its annotations"
            )
        if check_files:
            _check_image_file(path, (w, h), where, max_pixels, setting)
        sizes[iid] = (w, h)
    return sizes


def _check_image_file(
    path: Path, size: tuple[int, int], where: str, max_pixels: int, setting: str
) -> None:
    """The image exists, decodes, and has the size its record says."""
    try:
        found = path.is_file()
    except OSError as e:  # e.g. a name too long for the file system
        raise DataError(f"{where}: image file {short(str(path))}: {e.strerror}") from None
    if not found:
        raise DataError(f"{where}: image file {path} not found")
    actual = image_size(path, where, max_pixels, decode=True, setting=setting)
    if actual != size:
        turned = actual == size[::-1] and stored_size(path) == size
        raise DataError(
            f"{where}: {path} is {actual[0]}x{actual[1]} but the annotation says "
            f"{size[0]}x{size[1]}"
            + (
                " (its pixels are stored at that size, but its EXIF orientation turns the "
                "photo: rcnnops reads photos as shown, so the sizes, boxes and masks must "
                "be of the photo as shown)"
                if turned
                else ""
            )
        )


def _clipped_box(
    bbox: Any, size: tuple[int, int], iid: int, where: str, t: float, drop_degenerate: bool
) -> tuple[tuple[float, float, float, float], bool] | None:
    """``bbox`` ``[x, y, w, h]`` as xyxy clipped to the image and whether clipping
    changed it, or None when it has no extent left and ``drop_degenerate``.
    Overhang beyond ``t`` pixels is an error."""
    floats = finite_floats(bbox, 4)
    if floats is None:
        raise DataError(f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h], got {short(bbox)}")
    x, y, bw, bh = floats
    w, h = size
    if bw > 0 and bh > 0 and (x < -t or y < -t or x + bw > w + t or y + bh > h + t):
        raise DataError(f"{where}: bbox {short(bbox)} lies outside image id {iid} ({w}x{h})")
    x1, y1 = max(0.0, x), max(0.0, y)
    x2, y2 = min(float(w), x + bw), min(float(h), y + bh)
    if not (has_size(x1, x2) and has_size(y1, y2)):
        if drop_degenerate:
            return None
        raise DataError(
            f"{where}: bbox {bbox} has zero or negative size (width {bw}, height {bh}"
            f"{', once clipped to the image' if bw > 0 and bh > 0 else ''}); "
            "set prepare.drop_degenerate: true to drop such boxes"
        )
    return (x1, y1, x2, y2), (x1, y1, x2, y2) != (x, y, x + bw, y + bh)


def _check_area(ann: dict, size: tuple[int, int], where: str, t: float) -> None:
    """COCOeval's area ranges use ``area``: a number the image can hold."""
    area = finite_floats([ann["area"]], 1)
    most = (size[0] + 2 * t) * (size[1] + 2 * t)
    if area is None or not 0 <= area[0] <= most:
        raise DataError(
            f"{where}: 'area' must be a number in [0, {most:g}] (the image's "
            f"pixels), got {short(ann['area'])}"
        )


def _check_refs(
    a: dict, where: str, cats: dict[int, str], sizes: dict[int, tuple[int, int]]
) -> tuple[int, int]:
    """``(image_id, iscrowd)`` of annotation ``a``, checking its image and category exist."""
    iid = int_id(a, "image_id", where)
    if iid not in sizes:
        raise DataError(f"{where}: image_id {iid} is not in 'images'")
    cid = int_id(a, "category_id", where)
    if cid not in cats:
        raise DataError(f"{where}: unknown category_id {cid} (known: {sorted(cats)})")
    crowd = a.get("iscrowd", 0)
    if isinstance(crowd, bool) or not isinstance(crowd, int) or crowd not in (0, 1):
        raise DataError(f"{where}: 'iscrowd' must be 0 or 1, got {short(crowd)}")
    return iid, crowd


def _check_annotation(
    a: Any,
    i: int,
    src: Path,
    cats: dict[int, str],
    sizes: dict[int, tuple[int, int]],
    seen: set[int],
    report: ValidationReport,
    drop_degenerate: bool,
    t: float,
) -> dict | None:
    """The cleaned ``annotations[i]``, or None when dropped as degenerate (counted)."""
    if not isinstance(a, dict):
        raise DataError(f"{src}: annotations[{i}]: expected an object, got {short(a)}")
    # pycocotools' COCOeval reads a matched ground-truth id of 0 as "no match".
    aid = int_id(a, "id", f"{src}: annotations[{i}]", low=1)
    where = f"{src}: annotation id {aid}"
    if aid in seen:
        raise DataError(f"{where}: duplicate annotation id")
    seen.add(aid)
    iid, crowd = _check_refs(a, where, cats, sizes)
    box = _clipped_box(a.get("bbox"), sizes[iid], iid, where, t, drop_degenerate)
    if box is None:
        report.dropped_degenerate += 1
        report.dropped_ids.append(aid)
        return None
    (x1, y1, x2, y2), clipped = box
    out = dict(a, iscrowd=crowd)
    if clipped:
        report.clipped += 1
        out["bbox"] = [x1, y1, x2 - x1, y2 - y1]
    if "area" not in out:
        out["area"] = (x2 - x1) * (y2 - y1)
    else:
        _check_area(out, sizes[iid], where, t)
    seg = a.get("segmentation")
    if isinstance(seg, list) and seg and all(poly == [] for poly in seg):
        out["segmentation"] = seg = []  # [[]]: a box-only annotation as converters write it
        report.empty_polygons += 1
    if seg not in (None, []):  # [] or absent: a box-only annotation
        w, h = sizes[iid]
        check_segmentation(seg, w, h, where, t)
    report.crowd += crowd
    return out


def validate_coco(
    coco: Any,
    src: Path,
    image_root: Path,
    *,
    check_files: bool = True,
    drop_degenerate: bool = False,
    box_tolerance: float = 1.0,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    limit_setting: str = PARAMS_LIMIT,
) -> tuple[dict, ValidationReport]:
    """Validate a COCO instances dict; return a cleaned copy and a report.

    Raises :class:`DataError` naming ``src`` and the offending record on the
    first problem. Boxes overhanging the image by at most ``box_tolerance``
    pixels are clipped (and counted); zero-size boxes are errors unless
    ``drop_degenerate``, which drops and counts them. Segmentations (polygons
    or RLE), when present, must be well-formed and fit the image. With
    ``check_files`` every image is decoded once (a damaged file fails here)
    and images above ``max_image_pixels`` are refused (the error says to raise
    ``limit_setting``).
    """
    if not isinstance(coco, dict):
        raise DataError(f"{src}: expected a JSON object with {list(REQUIRED_KEYS)}")
    for key in REQUIRED_KEYS:
        if key not in coco:
            raise DataError(f"{src}: missing required key '{key}'")
        if not isinstance(coco[key], list):
            raise DataError(f"{src}: '{key}' must be a list")
    cats = _check_categories(coco, src)
    sizes = _check_images(coco, src, image_root, check_files, max_image_pixels, limit_setting)
    report = ValidationReport(images=len(sizes))
    anns, seen = [], set()
    for i, a in enumerate(coco["annotations"]):
        out = _check_annotation(
            a, i, src, cats, sizes, seen, report, drop_degenerate, box_tolerance
        )
        if out is not None:
            anns.append(out)
    report.annotations = len(anns)
    cleaned = {k: v for k, v in coco.items() if k != "annotations"}
    cleaned["annotations"] = anns
    return cleaned, report
