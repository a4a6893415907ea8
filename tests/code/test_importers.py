"""Dataset importers (Pascal VOC XML, instance-mask PNGs) -> validated COCO JSON."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from rcnnops.cli import main
from rcnnops.data.dataset import DetectionDataset, LabelMap
from rcnnops.data.importers import parse_classes
from rcnnops.data.importers.mask_png import import_masks
from rcnnops.data.importers.voc import VOC_CLASSES, import_voc
from rcnnops.data.io import DataError
from rcnnops.data.validate import validate_coco

# ----------------------------------------------------------------- fixtures


def _obj(name: str, box: tuple, difficult: int | str = 0) -> str:
    xmin, ymin, xmax, ymax = box
    return (
        f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>"
        f"<xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax>"
        "</bndbox></object>"
    )


def _xml(filename: str, objects: str, size: tuple[int, int] = (40, 30)) -> str:
    return (
        f"<annotation><filename>{filename}</filename><size><width>{size[0]}</width>"
        f"<height>{size[1]}</height><depth>3</depth></size>{objects}</annotation>"
    )


@pytest.fixture
def voc(tmp_path) -> Path:
    """Two 40x30 images: a.jpg (a dog filling it, a difficult cat), b.jpg (empty)."""
    src = tmp_path / "VOC"
    (src / "Annotations").mkdir(parents=True)
    (src / "JPEGImages").mkdir()
    for stem in ("a", "b"):
        Image.new("RGB", (40, 30), (90, 120, 30)).save(src / "JPEGImages" / f"{stem}.jpg")
    objects = _obj("dog", (1, 1, 40, 30)) + _obj("cat", (5, 6, 14, 20), difficult=1)
    (src / "Annotations" / "a.xml").write_text(_xml("a.jpg", objects))
    (src / "Annotations" / "b.xml").write_text(_xml("b.jpg", ""))
    return src


def _write_png(path: Path, arr: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8), mode="L")
    if mode == "P":
        im = im.convert("P")
        im.putpalette([v for i in range(256) for v in (i, i, i)])
    im.save(path)


# x: instance 1 a 3x2 block, instance 2 an L shape (5 px, bbox 3x3), 255 = void border px.
MASK_X = np.zeros((6, 8), np.uint8)
MASK_X[1:3, 1:4] = 1
MASK_X[3:6, 5] = 2
MASK_X[5, 6:8] = 2
MASK_X[0, 7] = 255
# y: one instance of value 7.
MASK_Y = np.zeros((6, 8), np.uint8)
MASK_Y[2:4, 2:6] = 7


@pytest.fixture
def masks(tmp_path) -> tuple[Path, Path]:
    """images/{x.png, y.jpg} (8x6) and masks/{x.png (L mode), y.png (palette)}."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    Image.new("RGB", (8, 6)).save(images / "x.png")
    Image.new("RGB", (8, 6)).save(images / "y.jpg")
    (images / "notes.txt").write_text("not an image")
    _write_png(masks / "x.png", MASK_X)
    _write_png(masks / "y.png", MASK_Y, mode="P")
    return images, masks


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _rle_decode(seg: dict) -> np.ndarray:
    return mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()})


# --------------------------------------------------------------------- VOC


def test_voc_round_trip_boxes_and_loading(voc, tmp_path):
    out = tmp_path / "out"
    res = import_voc(voc, out)
    assert res.path == out / "annotations" / "instances_train.json"
    coco = _load(res.path)
    assert [c["name"] for c in coco["categories"]] == list(VOC_CLASSES)
    assert coco["images"] == [
        {"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
        {"id": 2, "file_name": "b.jpg", "width": 40, "height": 30},
    ]
    dog, cat = VOC_CLASSES.index("dog") + 1, VOC_CLASSES.index("cat") + 1
    got = [(a["image_id"], a["category_id"], a["bbox"], a["area"]) for a in coco["annotations"]]
    # x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax (detectron2's reading of VOC).
    assert got == [(1, dog, [0, 0, 40, 30], 1200), (1, cat, [4, 5, 10, 15], 150)]
    assert all(a["iscrowd"] == 0 for a in coco["annotations"])
    assert (res.images, res.annotations, res.classes) == (2, 2, 20)
    validate_coco(coco, res.path, voc / "JPEGImages")
    ds = DetectionDataset(coco, voc / "JPEGImages", LabelMap.from_categories(coco["categories"]))
    _, target = ds[0]
    assert target["boxes"].tolist() == [[0, 0, 40, 30], [4, 5, 14, 20]]
    assert target["labels"].tolist() == [dog, cat]
    assert ds[1][1]["boxes"].shape == (0, 4)


def test_voc_skip_difficult_counts_and_custom_classes(voc, tmp_path):
    res = import_voc(voc, tmp_path / "out", classes=["dog", "cat"], skip_difficult=True)
    coco = _load(res.path)
    assert coco["categories"] == [
        {"id": 1, "name": "dog", "supercategory": ""},
        {"id": 2, "name": "cat", "supercategory": ""},
    ]
    assert [(a["category_id"], a["bbox"]) for a in coco["annotations"]] == [(1, [0, 0, 40, 30])]
    assert res.skipped == {"difficult objects skipped": 1}
    assert "1 difficult objects skipped" in res.summary()


def test_voc_split_file_chooses_ids(voc, tmp_path):
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "val.txt").write_text("b\n\n")
    res = import_voc(voc, tmp_path / "out", split="val")
    assert res.path.name == "instances_val.json"
    assert [im["file_name"] for im in _load(res.path)["images"]] == ["b.jpg"]
    with pytest.raises(DataError, match=r"train\.txt: split 'train' not found"):
        import_voc(voc, tmp_path / "out2", split="train")


def test_parse_classes():
    assert parse_classes(" a, b ,c") == ["a", "b", "c"]
    for bad in ("a,,b", "a,b,a"):
        with pytest.raises(DataError, match="--classes"):
            parse_classes(bad)


BAD_VOC = {
    "missing bndbox": (
        "<object><name>dog</name></object>",
        r"a\.xml: image id 'a': object 0 \('dog'\): missing <bndbox>",
    ),
    "unknown class": (
        _obj("dragon", (1, 1, 5, 5)),
        r"a\.xml: image id 'a': object 0 \('dragon'\): unknown class 'dragon'",
    ),
    "non-numeric": (
        _obj("dog", (1, "one", 5, 5)),
        r"a\.xml: image id 'a': object 0 \('dog'\): <ymin> must be a number, got 'one'",
    ),
    "nan": (_obj("dog", (1, "nan", 5, 5)), r"a\.xml: .*object 0.*<ymin> must be a finite"),
    "inverted": (
        _obj("dog", (1, 1, 5, 5)) + _obj("dog", (9, 1, 5, 5)),
        r"a\.xml: image id 'a': object 1 \('dog'\): inverted box \(xmin 9, ymin 1, xmax 5",
    ),
    "outside": (_obj("dog", (1, 1, 45, 5)), r"a\.xml: .*object 0.*lies outside the image"),
}


@pytest.mark.parametrize("case", list(BAD_VOC))
def test_voc_bad_object_names_file_and_record(voc, tmp_path, case):
    objects, pattern = BAD_VOC[case]
    (voc / "Annotations" / "a.xml").write_text(_xml("a.jpg", objects))
    out = tmp_path / "out"
    with pytest.raises(DataError, match=pattern):
        import_voc(voc, out)
    assert not out.exists()


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("<annotation><object>", r"a\.xml: not valid XML"),
        (
            '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">]>'
            "<annotation><filename>&lol;</filename></annotation>",
            r"a\.xml: DOCTYPE/ENTITY declarations are not allowed",
        ),
        ("<records/>", r"a\.xml: image id 'a': root element is <records>"),
        (_xml("a.jpg", "", size=(41, 30)), r"a\.xml: image id 'a': <size> says 41x30 but .*40x30"),
    ],
)
def test_voc_bad_xml(voc, tmp_path, text, pattern):
    (voc / "Annotations" / "a.xml").write_text(text)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=pattern):
        import_voc(voc, out)
    assert not out.exists()


def test_voc_listed_but_missing(voc, tmp_path):
    out = tmp_path / "out"
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "train.txt").write_text("a\nc\n")
    with pytest.raises(DataError, match=r"train\.txt: image id 'c': annotation .*c\.xml not found"):
        import_voc(voc, out)
    (voc / "ImageSets" / "Main" / "train.txt").write_text("a\nb\n")
    (voc / "JPEGImages" / "b.jpg").unlink()
    with pytest.raises(DataError, match=r"b\.xml: image id 'b': image not found .*\(tried b\.jpg"):
        import_voc(voc, out)
    assert not out.exists()


def test_voc_box_from_pixel_zero_is_written_clipped_and_counted(voc, tmp_path):
    """0-based tools write ``xmin`` 0, which VOC's 1-based reading puts at -1:
    within the tolerance, so it is clipped to the image as prepare would, and the
    file written says so (it kept the -1 before)."""
    (voc / "Annotations" / "a.xml").write_text(_xml("a.jpg", _obj("dog", (0, 3, 10, 30))))
    res = import_voc(voc, tmp_path / "out")
    (ann,) = _load(res.path)["annotations"]
    assert (ann["bbox"], ann["area"]) == ([0.0, 2.0, 10.0, 28.0], 10 * 28)
    assert res.skipped == {"boxes clipped to the image": 1}
    assert "1 boxes clipped to the image" in res.summary()


def test_voc_image_is_the_ids_not_a_stale_filename(voc, tmp_path):
    """As torchvision and detectron2 read VOC: ``<id>.<ext>`` first. A ``<filename>``
    left stale by a copied or renamed annotation (another record's image, or an
    absolute path from the machine it was made on) is not used while the id's
    image exists; it is the fallback for an image named otherwise."""
    (voc / "Annotations" / "a.xml").write_text(_xml("b.jpg", _obj("dog", (1, 1, 40, 30))))
    (voc / "Annotations" / "b.xml").write_text(_xml("/home/someone/VOC/JPEGImages/b.jpg", ""))
    coco = _load(import_voc(voc, tmp_path / "out").path)
    assert [im["file_name"] for im in coco["images"]] == ["a.jpg", "b.jpg"]
    assert [a["image_id"] for a in coco["annotations"]] == [1]
    (voc / "JPEGImages" / "a.jpg").rename(voc / "JPEGImages" / "photo_a.jpg")
    (voc / "Annotations" / "a.xml").write_text(_xml("photo_a.jpg", ""))
    coco = _load(import_voc(voc, tmp_path / "out2").path)
    assert [im["file_name"] for im in coco["images"]] == ["photo_a.jpg", "b.jpg"]


def test_voc_filename_escaping_the_image_folder_is_refused(voc, tmp_path):
    (voc / "JPEGImages" / "a.jpg").unlink()
    (voc / "Annotations" / "a.xml").write_text(_xml("../../secret.jpg", ""))
    with pytest.raises(DataError, match=r"a\.xml: image id 'a': <filename>: .*escapes the image"):
        import_voc(voc, tmp_path / "out")


@pytest.mark.parametrize(
    "encoding", ["utf-8", "utf-8-sig", "utf-16"], ids=["utf8", "utf8-bom", "utf16-bom"]
)
def test_voc_split_file_in_any_editors_encoding(voc, tmp_path, encoding):
    """Notepad writes a byte-order mark, PowerShell 5 writes UTF-16: the ids are
    the same (without the mark, the first id was 'a' preceded by U+FEFF)."""
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "train.txt").write_text("b\r\na\r\n", encoding=encoding)
    coco = _load(import_voc(voc, tmp_path / "out").path)
    assert [im["file_name"] for im in coco["images"]] == ["b.jpg", "a.jpg"]


def test_voc_split_file_that_is_not_text_names_the_file(voc, tmp_path):
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "train.txt").write_bytes(b"a\n\xe9b\n")
    with pytest.raises(DataError, match=r"train\.txt: not UTF-8 or UTF-16 text"):
        import_voc(voc, tmp_path / "out")


def test_voc_difficult_flags_as_tools_write_them(voc, tmp_path):
    """``<difficult>`` as 0/1, 0.0/1.0, true/false or empty: only the set ones are
    skipped (every value but "0" and "" used to count as difficult); another
    value is an error naming the object, not a guess."""
    values = ["1", "false", "0.0", "True", "", "1.0", "0"]
    objects = "".join(_obj("dog", (1, 1, 9, 9), difficult=v) for v in values)
    (voc / "Annotations" / "a.xml").write_text(_xml("a.jpg", objects))
    res = import_voc(voc, tmp_path / "out", skip_difficult=True)
    assert res.skipped == {"difficult objects skipped": 3}
    assert res.annotations == 4
    (voc / "Annotations" / "a.xml").write_text(_xml("a.jpg", _obj("dog", (1, 1, 9, 9), "maybe")))
    pattern = r"a\.xml: .*object 0 \('dog'\): <difficult> must be 0 or 1, got 'maybe'"
    with pytest.raises(DataError, match=pattern):
        import_voc(voc, tmp_path / "out2")


# ------------------------------------------------------------------- masks


def test_masks_round_trip_rle_boxes_areas(masks, tmp_path):
    images, mask_dir = masks
    res = import_masks(images, mask_dir, tmp_path / "out", class_name="pedestrian")
    coco = _load(res.path)
    assert coco["categories"] == [{"id": 1, "name": "pedestrian", "supercategory": ""}]
    assert [im["file_name"] for im in coco["images"]] == ["x.png", "y.jpg"]
    anns = coco["annotations"]
    # No --ignore-value: 255 is an instance like any other.
    assert [(a["image_id"], a["bbox"], a["area"]) for a in anns] == [
        (1, [1, 1, 3, 2], 6),
        (1, [5, 3, 3, 3], 5),
        (1, [7, 0, 1, 1], 1),
        (2, [2, 2, 4, 2], 8),
    ]
    expected = [MASK_X == 1, MASK_X == 2, MASK_X == 255, MASK_Y == 7]
    for a, want in zip(anns, expected, strict=True):
        assert a["iscrowd"] == 0 and a["category_id"] == 1
        assert np.array_equal(_rle_decode(a["segmentation"]), want.astype(np.uint8))
    validate_coco(coco, res.path, images)
    labels = LabelMap.from_categories(coco["categories"])
    mask_opts = [p for p in inspect.signature(DetectionDataset).parameters if "mask" in p]
    kwargs = {mask_opts[0]: True} if mask_opts else {}
    _, target = DetectionDataset(coco, images, labels, **kwargs)[0]
    assert target["boxes"].tolist() == [[1, 1, 4, 3], [5, 3, 8, 6], [7, 0, 8, 1]]
    if "masks" in target:
        assert target["masks"].shape == (3, 6, 8)
        assert np.array_equal(target["masks"][1].numpy(), (MASK_X == 2).astype(np.uint8))


def test_masks_ignore_value_is_counted(masks, tmp_path):
    images, mask_dir = masks
    res = import_masks(images, mask_dir, tmp_path / "out", class_name="p", ignore_value=255)
    assert [a["bbox"] for a in _load(res.path)["annotations"]] == [
        [1, 1, 3, 2],
        [5, 3, 3, 3],
        [2, 2, 4, 2],
    ]
    assert res.skipped == {"images without masks": 0, "value-255 regions ignored": 1}


def test_masks_per_class_subfolders(masks, tmp_path):
    images, _ = masks
    by_class = tmp_path / "by_class"
    _write_png(by_class / "person" / "x.png", MASK_X == 1)
    _write_png(by_class / "car" / "x.png", (MASK_X == 2) * 3)
    _write_png(by_class / "car" / "y.png", MASK_Y)
    res = import_masks(images, by_class, tmp_path / "out", split="val")
    coco = _load(res.path)
    assert res.path.name == "instances_val.json" and res.classes == 2
    assert [c["name"] for c in coco["categories"]] == ["car", "person"]
    got = [(a["image_id"], a["category_id"], a["bbox"]) for a in coco["annotations"]]
    assert got == [(1, 1, [5, 3, 3, 3]), (1, 2, [1, 1, 3, 2]), (2, 1, [2, 2, 4, 2])]


def test_masks_suffix_as_in_pennfudan(masks, tmp_path):
    images, mask_dir = masks
    for p in mask_dir.glob("*.png"):
        p.rename(p.with_name(f"{p.stem}_mask.png"))
    res = import_masks(images, mask_dir, tmp_path / "out", class_name="p", mask_suffix="_mask")
    assert res.annotations == 4


def test_masks_missing_mask_error_or_kept(masks, tmp_path):
    images, mask_dir = masks
    (mask_dir / "y.png").unlink()
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"y\.jpg: image id 2: no mask y\.png in .*masks"):
        import_masks(images, mask_dir, out, class_name="p")
    assert not out.exists()
    res = import_masks(images, mask_dir, out, class_name="p", allow_missing_masks=True)
    coco = _load(res.path)
    assert len(coco["images"]) == 2 and {a["image_id"] for a in coco["annotations"]} == {1}
    assert res.skipped["images without masks"] == 1


def test_masks_bad_inputs_name_file_and_record(masks, tmp_path):
    images, mask_dir = masks
    out = tmp_path / "out"
    _write_png(mask_dir / "z.png", MASK_Y)
    with pytest.raises(DataError, match=r"z\.png: mask without an image \(no z\.\*"):
        import_masks(images, mask_dir, out, class_name="p")
    (mask_dir / "z.png").unlink()
    _write_png(mask_dir / "y.png", np.zeros((6, 7)))
    with pytest.raises(DataError, match=r"y\.png: mask is 7x6 but its image .*y\.jpg is 8x6"):
        import_masks(images, mask_dir, out, class_name="p")
    Image.new("RGB", (8, 6)).save(mask_dir / "y.png")
    with pytest.raises(DataError, match=r"y\.png: mask must be single-channel .*got RGB"):
        import_masks(images, mask_dir, out, class_name="p")
    with pytest.raises(DataError, match=r"masks: no per-class subfolders .*--class-name"):
        import_masks(images, mask_dir, out)
    assert not out.exists()


# --------------------------------------------------------------------- CLI


def test_cli_import_voc_and_masks(voc, masks, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = ["-C", str(tmp_path), "import", "voc", str(voc), str(out), "--skip-difficult"]
    assert main([*argv, "--classes", "dog,cat"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("imported voc split train: 2 images, 1 annotations, 2 classes")
    assert "1 difficult objects skipped" in line and "images: ../VOC/JPEGImages" in line
    images, mask_dir = masks
    argv = ["-C", str(tmp_path), "import", "masks", "--images", str(images)]
    argv += ["--masks", str(mask_dir), str(out), "--split", "val", "--class-name", "p"]
    assert main([*argv, "--ignore-value", "255"]) == 0
    assert "3 annotations, 1 classes" in capsys.readouterr().out
    assert (out / "annotations" / "instances_val.json").is_file()


def test_cli_import_error_exit_2(voc, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (voc / "Annotations" / "b.xml").write_text(_xml("b.jpg", _obj("dragon", (1, 1, 2, 2))))
    out = tmp_path / "out"
    assert main(["-C", str(tmp_path), "import", "voc", str(voc), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rcnnops import: error: ") and "b.xml" in err and "'dragon'" in err
    assert "Traceback" not in err and not out.exists()
    out.write_text("")  # the output folder named is a file: one line, not a traceback
    (voc / "Annotations" / "b.xml").write_text(_xml("b.jpg", ""))
    assert main(["-C", str(tmp_path), "import", "voc", str(voc), str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"rcnnops import: error: [Errno 20] Not a directory: '{out}/annotations'\n"


def test_cli_import_pixel_limit_is_an_option_and_names_the_source(
    voc, masks, tmp_path, monkeypatch, capsys
):
    """The importers refuse images above prepare's default limit, as prepare does;
    the error named the output file, an id the user never gave, and a params key
    the importers do not read. It names the XML (or the image) and the option now,
    and the option raises the limit (above Pillow's own guard too)."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # Pillow refuses above 1000
    out = tmp_path / "out"
    argv = ["import", "voc", str(voc), str(out), "--max-image-pixels"]
    assert main([*argv, "1000"]) == 2  # the images are 40x30
    err = capsys.readouterr().err
    assert f"error: {voc}/Annotations/a.xml: image id 'a': image " in err
    assert "is 40x30 = 1200 pixels, above the limit of 1000 (raise --max-image-pixels" in err
    assert not out.exists()
    assert main([*argv, "1200"]) == 0
    images, mask_dir = masks  # 8x6
    argv = ["import", "masks", "--images", str(images), "--masks", str(mask_dir), str(out)]
    argv += ["--class-name", "p", "--split", "val", "--max-image-pixels"]
    assert main([*argv, "40"]) == 2
    err = capsys.readouterr().err
    assert f"error: {images}/x.png: image id 1: image" in err and "(raise --max-image-pixels" in err
    assert main([*argv, "48"]) == 0


def test_upper_case_extensions_and_macos_files_are_read_as_users_have_them(voc, masks, tmp_path):
    """A.JPG was "image not found (tried A.jpg ...)", a mask x.PNG "no mask x.png",
    and a macOS AppleDouble ._x.png beside the masks failed the whole import as a
    mask without an image."""
    (voc / "JPEGImages" / "a.jpg").rename(voc / "JPEGImages" / "a.JPG")
    coco = _load(import_voc(voc, tmp_path / "voc-out").path)
    assert [im["file_name"] for im in coco["images"]] == ["a.JPG", "b.jpg"]
    images, mask_dir = masks
    (mask_dir / "x.png").rename(mask_dir / "x.PNG")
    (mask_dir / "._x.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    coco = _load(import_masks(images, mask_dir, tmp_path / "out", class_name="p").path)
    assert [a["image_id"] for a in coco["annotations"]] == [1, 1, 1, 2]


def test_voc_two_records_on_one_image_name_both_annotations(voc, tmp_path):
    """The error named the output JSON (never written) and COCO id 2."""
    (voc / "JPEGImages" / "b.jpg").unlink()  # b.xml's <filename> b.jpg: now a.jpg's copy
    (voc / "Annotations" / "b.xml").write_text(_xml("a.jpg", ""))
    with pytest.raises(DataError) as e:
        import_voc(voc, tmp_path / "out")
    message = str(e.value)
    assert "b.xml: image id 'b': its image a.jpg is also the image of" in message
    assert message.endswith("give each record its own image") and "a.xml" in message
    assert not (tmp_path / "out").exists()
