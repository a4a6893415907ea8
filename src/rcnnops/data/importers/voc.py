"""Pascal VOC import: ``Annotations/*.xml`` + ``JPEGImages/*`` -> COCO instances.

VOC boxes are 1-based inclusive pixel indices; they become COCO ``[x, y, w, h]``
pixels as detectron2 reads them (see :func:`voc_box_to_xywh`). XML is parsed
with expat refusing any DTD (see :func:`parse_xml`).
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from xml.parsers import expat

from rcnnops.data.importers import (
    IMAGE_EXTENSIONS,
    LIMIT_OPTION,
    MAX_IMAGE_PIXELS,
    ImportResult,
    categories,
    write_coco,
)
from rcnnops.data.io import DataError, image_size, safe_image_path

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
# Same overhang tolerance (pixels) as ``validate_coco``'s default.
BOX_TOLERANCE = 1.0


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


def _read_text(path: Path) -> str:
    """A text file as written by any editor: UTF-8 with or without a byte-order
    mark, or UTF-16 with one (PowerShell 5's default)."""
    data = path.read_bytes()
    encoding = "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        why = f"{e.reason} at byte {e.start}"
        raise DataError(f"{path}: not UTF-8 or UTF-16 text ({why})") from None


def _voc_ids(src: Path, split: str) -> tuple[list[str], Path | None]:
    """Image ids from ``ImageSets/Main/<split>.txt``, else every ``Annotations/*.xml``."""
    sets = src / "ImageSets" / "Main"
    listing = sets / f"{split}.txt"
    if listing.is_file():
        ids: list[str] = []
        for n, line in enumerate(_read_text(listing).splitlines(), start=1):
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
    """The image of one VOC record: ``<id>.<ext>`` in the image folder, as
    torchvision and detectron2 read VOC; else ``<filename>`` (a file named
    otherwise). ``<filename>`` is only a fallback because tools that copy or
    rename annotations leave it stale: taken first, it would put one image's boxes
    on another image's pixels."""
    for ext in (*IMAGE_EXTENSIONS, *(e.upper() for e in IMAGE_EXTENSIONS)):  # A.JPG too
        path = safe_image_path(images, iid + ext, where)
        if path.is_file():
            return path
    named = _text(root, "filename")
    if named:
        path = safe_image_path(images, named, f"{where}: <filename>")
        if path.is_file():
            return path
    tried = f"{iid}.jpg" + (f" or <filename> {named!r}" if named else "")
    raise DataError(f"{where}: image not found in {images} (tried {tried} and other extensions)")


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


_FLAGS = {"": False, "0": False, "false": False, "no": False, "1": True, "true": True, "yes": True}


def _flag(text: str | None, where: str) -> bool:
    """A VOC 0/1 flag such as ``<difficult>``; absent or empty is 0. Numbers
    (``0.0``) and ``true``/``false`` as other tools write them; anything else is an
    error rather than a guess (a guess would keep or drop objects silently)."""
    if text is None:
        return False
    value = text.strip().lower()
    if value in _FLAGS:
        return _FLAGS[value]
    try:
        number = float(value)
    except ValueError:
        number = None
    if number in (0.0, 1.0):
        return number == 1.0
    raise DataError(f"{where} must be 0 or 1, got {text!r}")


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
        difficult = _flag(_text(obj, "difficult"), f"{at}: <difficult>")
        objects.append((cat_ids[name], [x, y, w, h], difficult))
    return objects


def import_voc(
    src: Path,
    out: Path,
    split: str = "train",
    classes: Sequence[str] | None = None,
    skip_difficult: bool = False,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> ImportResult:
    """Convert a VOC folder (``Annotations/*.xml``, ``JPEGImages/*``) to COCO instances.

    Images come from ``ImageSets/Main/<split>.txt`` when that file exists, else
    from every ``Annotations/*.xml``. Categories are ``classes`` (ids 1..K in
    order; default the 20 Pascal VOC classes). Boxes: see :func:`voc_box_to_xywh`.
    ``difficult`` objects are kept (``iscrowd`` 0) unless ``skip_difficult``,
    which drops and counts them. Images above ``max_image_pixels`` are refused.
    """
    src, out = Path(src), Path(out)
    images = src / "JPEGImages"
    names = list(classes) if classes is not None else list(VOC_CLASSES)
    cat_ids = {n: i for i, n in enumerate(names, start=1)}
    ids, listing = _voc_ids(src, split)
    coco: dict = {"images": [], "annotations": [], "categories": categories(names)}
    if not ids:
        raise DataError(f"{listing or src / 'Annotations'}: no images to import")
    skipped = 0
    taken: dict[str, Path] = {}  # image file -> the record that named it
    for image_id, iid in enumerate(ids, start=1):
        xml_path = src / "Annotations" / f"{iid}.xml"
        if not xml_path.is_file():
            raise DataError(f"{listing or src}: image id {iid!r}: annotation {xml_path} not found")
        root = parse_xml(xml_path)
        where = f"{xml_path}: image id {iid!r}"
        if root.tag != "annotation":
            raise DataError(f"{where}: root element is <{root.tag}>, expected <annotation>")
        path = _voc_image(images, root, iid, where)
        size = image_size(path, where, max_image_pixels, setting=LIMIT_OPTION)
        _check_voc_size(root, size, path, where)
        rel = path.relative_to(images.resolve()).as_posix()
        if rel in taken:  # (the COCO check after would name the unwritten output)
            raise DataError(
                f"{where}: its image {rel} is also the image of {taken[rel]} (a <filename> "
                "copied with the annotation?); give each record its own image"
            )
        taken[rel] = xml_path
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
                    "bbox": bbox,  # its area: the box's, once clipped (write_coco)
                    "iscrowd": 0,
                }
            )
    path, changed = write_coco(coco, out, split, images, max_image_pixels)
    extra = ({"difficult objects skipped": skipped} if skip_difficult else {}) | changed
    return ImportResult(
        path, images, len(coco["images"]), len(coco["annotations"]), len(names), extra
    )
