"""Dataset importers: Pascal VOC XML folders and instance-mask PNG folders -> COCO JSON.

Both write ``<out>/annotations/instances_<split>.json`` (a COCO instances file)
and copy no images: each ``file_name`` is relative to the images folder the
importer reports (``JPEGImages`` for VOC, ``--images`` for masks), so
``params.yaml`` points at the result with::

    data:
      root: <out>
      train: {annotations: annotations/instances_train.json, images: <images, relative to out>}

Boxes are written as COCO ``[x, y, w, h]`` in absolute pixels of the image as
stored on disk (after EXIF rotation, as the rest of rcnnops reads images).
The result is checked with :func:`validate_coco` and written atomically
(temporary file + ``os.replace``): on any error nothing is written.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.parsers import expat

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from rcnnops.data.coco import DataError, _image_size, safe_image_path, validate_coco
from rcnnops.data.masks import encode, to_rle

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L")
# Same overhang tolerance (pixels) as ``validate_coco``'s default.
BOX_TOLERANCE = 1.0
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass
class ImportResult:
    """What an importer wrote, for the one-line CLI summary."""

    path: Path
    image_root: Path
    images: int
    annotations: int
    classes: int
    skipped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        rel = os.path.relpath(self.image_root.resolve(), self.path.parent.parent.resolve())
        skipped = "".join(f", {n} {what}" for what, n in self.skipped.items())
        return (
            f"{self.images} images, {self.annotations} annotations, {self.classes} classes"
            f"{skipped} -> {self.path} (images: {rel}, relative to the output folder)"
        )


def parse_classes(text: str) -> list[str]:
    """``"a,b,c"`` -> ``["a", "b", "c"]``; category ids are 1..K in this order."""
    names = [n.strip() for n in text.split(",")]
    if not names or any(not n for n in names):
        raise DataError(f"--classes {text!r}: give comma-separated non-empty class names")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"--classes {text!r}: duplicate class name(s) {dupes}")
    return names


def _categories(names: Sequence[str]) -> list[dict]:
    return [{"id": i, "name": n, "supercategory": ""} for i, n in enumerate(names, start=1)]


def write_coco(coco: dict, out: Path, split: str, image_root: Path) -> Path:
    """Validate ``coco`` then write ``<out>/annotations/instances_<split>.json`` atomically."""
    if not _SPLIT_NAME.fullmatch(split):
        raise DataError(f"split name {split!r}: use letters, digits, '_', '-' or '.'")
    path = Path(out) / "annotations" / f"instances_{split}.json"
    validate_coco(coco, path, image_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(coco, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------- VOC


def _refuse_dtd(*_args) -> None:
    raise DataError("DOCTYPE/ENTITY declarations are not allowed (entity-expansion guard)")


def parse_xml(path: Path) -> ET.Element:
    """Parse an XML file with expat, refusing any DOCTYPE or ENTITY declaration.

    A VOC annotation never needs a DTD; refusing one rules out entity-expansion
    ("billion laughs") and external-entity tricks without extra dependencies.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    builder = ET.TreeBuilder()
    parser = expat.ParserCreate()
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = _refuse_dtd
    parser.EntityDeclHandler = _refuse_dtd
    parser.StartElementHandler = builder.start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(data, True)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    except expat.ExpatError as e:
        raise DataError(f"{path}: not valid XML: {e}") from None
    return builder.close()


def _voc_ids(src: Path, split: str) -> tuple[list[str], Path | None]:
    """Image ids from ``ImageSets/Main/<split>.txt``, else every ``Annotations/*.xml``."""
    sets = src / "ImageSets" / "Main"
    listing = sets / f"{split}.txt"
    if listing.is_file():
        ids: list[str] = []
        for n, line in enumerate(listing.read_text().splitlines(), start=1):
            if not line.split():
                continue
            iid = line.split()[0]
            if iid in ids:
                raise DataError(f"{listing}: line {n}: image id {iid!r} is listed twice")
            ids.append(iid)
        return ids, listing
    if sets.is_dir():
        found = sorted(p.stem for p in sets.glob("*.txt") if "_" not in p.stem)
        raise DataError(f"{listing}: split {split!r} not found (available: {found})")
    if not (src / "Annotations").is_dir():
        raise DataError(f"{src}: not a VOC folder (no Annotations/ folder)")
    return sorted(p.stem for p in (src / "Annotations").glob("*.xml")), None


def _text(node: ET.Element, tag: str) -> str | None:
    child = node.find(tag)
    return None if child is None or child.text is None else child.text.strip()


def _coord(box: ET.Element, tag: str, where: str) -> float:
    text = _text(box, tag)
    if text is None:
        raise DataError(f"{where}: <bndbox> has no <{tag}>")
    try:
        v = float(text)
    except ValueError:
        raise DataError(f"{where}: <{tag}> must be a number, got {text!r}") from None
    if not math.isfinite(v):
        raise DataError(f"{where}: <{tag}> must be a finite number, got {text!r}")
    return v


def voc_box_to_xywh(box: ET.Element, where: str) -> list[float]:
    """A VOC ``<bndbox>`` (1-based, inclusive pixel indices) as COCO ``[x, y, w, h]``.

    As detectron2 reads VOC: ``x1 = xmin - 1``, ``y1 = ymin - 1``, ``x2 = xmax``,
    ``y2 = ymax`` (so a box covering pixels 1..W of a W-wide image becomes
    ``x=0, w=W``). ``xmax == xmin`` is a one-pixel-wide box; ``xmax < xmin`` is an error.
    """
    xmin, ymin, xmax, ymax = (_coord(box, t, where) for t in ("xmin", "ymin", "xmax", "ymax"))
    if xmax < xmin or ymax < ymin:
        raise DataError(
            f"{where}: inverted box (xmin {xmin:g}, ymin {ymin:g}, xmax {xmax:g}, ymax {ymax:g})"
        )
    return [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]


def _voc_image(images: Path, root: ET.Element, iid: str, where: str) -> Path:
    """The image of one VOC record: ``<filename>`` if it exists, else ``<id>.<ext>``."""
    names = [_text(root, "filename")] + [iid + ext for ext in IMAGE_EXTENSIONS]
    for name in names:
        if name:
            path = safe_image_path(images, name, where)
            if path.is_file():
                return path
    raise DataError(f"{where}: image not found in {images} (tried {names[0] or iid + '.jpg'})")


def _check_voc_size(root: ET.Element, size: tuple[int, int], path: Path, where: str) -> None:
    w, h = _text(root, "size/width"), _text(root, "size/height")
    try:
        declared = (int(float(w)), int(float(h))) if w and h else None
    except ValueError:
        raise DataError(f"{where}: <size> must be numbers, got {w!r}x{h!r}") from None
    if declared and declared != (0, 0) and declared != size:
        raise DataError(
            f"{where}: <size> says {declared[0]}x{declared[1]} but {path} is {size[0]}x{size[1]}"
        )


def _voc_objects(
    root: ET.Element, cat_ids: dict[str, int], size: tuple[int, int], where: str
) -> list[tuple[int, list[float], bool]]:
    """``(category_id, [x, y, w, h], difficult)`` for each ``<object>``."""
    objects = []
    for k, obj in enumerate(root.findall("object")):
        name = _text(obj, "name")
        at = f"{where}: object {k} ({name!r})"
        if not name:
            raise DataError(f"{where}: object {k}: missing <name>")
        if name not in cat_ids:
            raise DataError(f"{at}: unknown class {name!r} (known: {sorted(cat_ids)})")
        box = obj.find("bndbox")
        if box is None:
            raise DataError(f"{at}: missing <bndbox>")
        x, y, w, h = voc_box_to_xywh(box, at)
        t = BOX_TOLERANCE
        if x < -t or y < -t or x + w > size[0] + t or y + h > size[1] + t:
            raise DataError(f"{at}: box [{x:g}, {y:g}, {w:g}, {h:g}] lies outside the image")
        difficult = _text(obj, "difficult") not in (None, "", "0")
        objects.append((cat_ids[name], [x, y, w, h], difficult))
    return objects


def import_voc(
    src: Path,
    out: Path,
    split: str = "train",
    classes: Sequence[str] | None = None,
    skip_difficult: bool = False,
) -> ImportResult:
    """Convert a VOC folder (``Annotations/*.xml``, ``JPEGImages/*``) to COCO instances.

    Images come from ``ImageSets/Main/<split>.txt`` when that file exists, else
    from every ``Annotations/*.xml``. Categories are ``classes`` (ids 1..K in
    order; default the 20 Pascal VOC classes). Boxes: see :func:`voc_box_to_xywh`.
    ``difficult`` objects are kept (``iscrowd`` 0) unless ``skip_difficult``,
    which drops and counts them.
    """
    src, out = Path(src), Path(out)
    images = src / "JPEGImages"
    names = list(classes) if classes is not None else list(VOC_CLASSES)
    cat_ids = {n: i for i, n in enumerate(names, start=1)}
    ids, listing = _voc_ids(src, split)
    coco: dict = {"images": [], "annotations": [], "categories": _categories(names)}
    if not ids:
        raise DataError(f"{listing or src / 'Annotations'}: no images to import")
    skipped = 0
    for image_id, iid in enumerate(ids, start=1):
        xml_path = src / "Annotations" / f"{iid}.xml"
        if not xml_path.is_file():
            raise DataError(f"{listing or src}: image id {iid!r}: annotation {xml_path} not found")
        root = parse_xml(xml_path)
        where = f"{xml_path}: image id {iid!r}"
        if root.tag != "annotation":
            raise DataError(f"{where}: root element is <{root.tag}>, expected <annotation>")
        path = _voc_image(images, root, iid, where)
        size = _image_size(path, where)
        _check_voc_size(root, size, path, where)
        rel = path.relative_to(images.resolve()).as_posix()
        coco["images"].append(
            {"id": image_id, "file_name": rel, "width": size[0], "height": size[1]}
        )
        for cid, bbox, difficult in _voc_objects(root, cat_ids, size, where):
            if difficult and skip_difficult:
                skipped += 1
                continue
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": cid,
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                }
            )
    path = write_coco(coco, out, split, images)
    extra = {"difficult objects skipped": skipped} if skip_difficult else {}
    return ImportResult(
        path, images, len(coco["images"]), len(coco["annotations"]), len(names), extra
    )


# ------------------------------------------------------------------ mask PNGs


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


def _orphan_masks(folders: dict[str, Path], stems: set[str], suffix: str) -> None:
    for folder in folders.values():
        for p in sorted(folder.glob(f"*{suffix}.png")):
            stem = p.name[: -len(f"{suffix}.png")]
            if stem not in stems:
                raise DataError(f"{p}: mask without an image (no {stem}.* in the image folder)")


def import_masks(
    images: Path,
    masks: Path,
    out: Path,
    split: str = "train",
    class_name: str | None = None,
    ignore_value: int | None = None,
    allow_missing_masks: bool = False,
    mask_suffix: str = "",
) -> ImportResult:
    """Convert an images folder + instance-mask PNGs to COCO instances with RLE masks.

    ``masks/<stem><mask_suffix>.png`` belongs to image ``<stem>.<ext>``; each
    distinct non-zero value in it is one instance. With ``class_name`` every
    instance is that class; otherwise each subfolder ``masks/<class>/`` is one
    class (ids 1..K in sorted order). Instances of value ``ignore_value`` (e.g.
    255, "void") are skipped and counted. Boxes are COCO ``[x, y, w, h]`` pixels
    of the tight box around the mask. An image with no mask at all is an error
    unless ``allow_missing_masks`` (kept with no annotations, and counted).
    """
    images, masks = Path(images), Path(masks)
    files = _list_images(images)
    folders = _mask_folders(masks, class_name)
    _orphan_masks(folders, set(files), mask_suffix)
    coco: dict = {"images": [], "annotations": [], "categories": _categories(list(folders))}
    ignored = missing = 0
    for image_id, (stem, path) in enumerate(files.items(), start=1):
        where = f"{path}: image id {image_id}"
        w, h = _image_size(path, where)
        coco["images"].append({"id": image_id, "file_name": path.name, "width": w, "height": h})
        found = False
        for cat_id, folder in enumerate(folders.values(), start=1):
            mask_path = folder / f"{stem}{mask_suffix}.png"
            if not mask_path.is_file():
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
        if not found:
            if not allow_missing_masks:
                searched = ", ".join(str(f) for f in folders.values())
                raise DataError(
                    f"{where}: no mask {stem}{mask_suffix}.png in {searched} "
                    "(use --allow-missing-masks to keep it without annotations)"
                )
            missing += 1
    path = write_coco(coco, Path(out), split, images)
    extra = {"images without masks": missing}
    if ignore_value is not None:
        extra[f"value-{ignore_value} regions ignored"] = ignored
    return ImportResult(
        path, images, len(coco["images"]), len(coco["annotations"]), len(folders), extra
    )
