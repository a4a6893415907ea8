"""Reliability of the data path (issue 6, items 5 and 6).

- A hypothesis fuzz of the COCO reader and validator: a valid tiny COCO dict is
  mutated (wrong types, missing keys, bad numbers, unknown or duplicate ids, bad
  polygons and RLE...) and run through ``prepare`` -> ``load_split`` ->
  ``DetectionDataset`` (boxes, labels, masks). Every case either loads valid data
  or raises :class:`DataError`; anything else is a bug in the validator.
- Awkward image files (truncated, empty, 16-bit, grey, CMYK, palette,
  EXIF-rotated, too many pixels): read as RGB, or refused naming the file.
- Corrupt prepared and proposal files written by the real stage functions:
  refused naming the file and the command that rebuilds it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import re
import shutil
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from rcnnops import cli
from rcnnops.config import (
    DataParams,
    ParamsError,
    PrepareParams,
    ProposalsParams,
    SplitSource,
    parse_params,
)
from rcnnops.data.dataset import DetectionDataset
from rcnnops.data.io import DataError, load_image_array, read_json
from rcnnops.data.masks import encode
from rcnnops.data.prepare import SPLITS, load_split, prepare
from rcnnops.data.shapes import generate
from rcnnops.data.validate import validate_coco
from rcnnops.proposals.precompute import (
    ProposalError,
    ProposalStore,
    SearchSettings,
    open_store,
    precompute,
)
from tests.conftest import TINY, TINY_PARAMS

SIZES = {"a.png": (32, 24), "b.png": (20, 30), "c.png": (16, 16)}  # (width, height)


def _png(path: Path, w: int, h: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory) -> Path:
    """Images written once per module; the fuzz cases reuse them."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "images").mkdir()
    for k, (name, (w, h)) in enumerate(SIZES.items()):
        _png(root / "images" / name, w, h, k)
    return root


def _valid_coco() -> dict:
    """Every kind of record the reader knows: polygon, compressed RLE, crowd RLE
    (uncompressed), a box-only annotation, an image with no annotation."""
    mask = np.zeros((24, 32), np.uint8)
    mask[5:15, 15:25] = 1
    crowd = {"size": [30, 20], "counts": [0, 30 * 5, 30 * 15]}
    return {
        "info": {"description": "fuzz"},
        "images": [
            {"id": 1, "file_name": "a.png", "width": 32, "height": 24},
            {"id": 2, "file_name": "b.png", "width": 20, "height": 30},
            {"id": 5, "file_name": "c.png", "width": 16, "height": 16},
        ],
        "categories": [
            {"id": 1, "name": "cat", "supercategory": "animal"},
            {"id": 7, "name": "dog"},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [2, 3, 10, 8],
                "area": 80.0,
                "iscrowd": 0,
                "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]],
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 7,
                "bbox": [15, 5, 10, 10],
                "iscrowd": 0,
                "segmentation": encode(mask),
            },
            {
                "id": 3,
                "image_id": 2,
                "category_id": 1,
                "bbox": [5.0, 0.0, 15.0, 30.0],
                "iscrowd": 1,
                "segmentation": crowd,
            },
            {"id": 4, "image_id": 2, "category_id": 7, "bbox": [1.5, 2.5, 5, 6]},
        ],
    }


def _locations(node, path=()):
    """Every (path, value) in a JSON tree, the root excluded."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for k, v in items:
        yield path + (k,), v
        if isinstance(v, dict | list):
            yield from _locations(v, path + (k,))


def _parent(doc, path):
    for k in path[:-1]:
        doc = doc[k]
    return doc


SPECIAL = [
    -1,
    0,
    1,
    -0.5,
    0.5,
    1e-300,
    1e308,
    -1e308,
    math.nan,
    math.inf,
    -math.inf,
    2**31,
    2**63,
    -(2**63) - 1,
    10**30,
    10**400,
    True,
    False,
    None,
    "",
    "1",
    "NaN",
    "..",
    "../a.png",
    "/etc/passwd",
    "a.png\x00",
    "\ud800",
    "x" * 300,  # longer than a file name may be
    [],
    {},
    [1, 2, 3, 4],
    [[]],
    [[1, 2, 3, 4]],
    {"size": [24, 32], "counts": "0"},
    {"size": [24, 32], "counts": [768]},
    {"size": [24, 32], "counts": [-1, 769]},
    {"size": [24, 32], "counts": "\x7f\x7f"},
    {"size": [24, 32], "counts": "ooooooooooooooo"},
    {"size": [24, 32], "counts": "PPPPP"},
    {"size": [24, 32], "counts": "0P10"},
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(SPECIAL),
)
junk = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=10,
)
KEYS = [
    "id",
    "image_id",
    "category_id",
    "bbox",
    "area",
    "iscrowd",
    "segmentation",
    "size",
    "counts",
    "width",
    "height",
    "file_name",
    "name",
    "images",
    "annotations",
    "categories",
]


def _fresh(data, strategy):
    """A drawn value never shared with other cases (SPECIAL's lists and dicts are
    edited in place by later mutations; sharing them makes generation flaky)."""
    return copy.deepcopy(data.draw(strategy))


def _mutate(doc: dict, data) -> None:
    """One random edit of ``doc`` in place."""
    locs = list(_locations(doc))
    op = data.draw(
        st.sampled_from(
            [
                "replace",
                "special",
                "delete",
                "duplicate",
                "insert",
                "add_key",
                "number",
                "string",
                "borrow",
            ]
        )
    )
    path, value = data.draw(st.sampled_from(locs)) if locs else ((), doc)
    if not path:
        return
    parent, key = _parent(doc, path), path[-1]
    if op == "replace":
        parent[key] = _fresh(data, junk)
    elif op == "special":
        parent[key] = _fresh(data, st.sampled_from(SPECIAL))
    elif op == "delete":
        del parent[key]
    elif op == "duplicate" and isinstance(parent, list):
        parent.append(copy.deepcopy(value))
    elif op == "insert" and isinstance(value, list):
        value.insert(data.draw(st.integers(0, len(value))), _fresh(data, junk))
    elif op == "add_key" and isinstance(value, dict):
        value[data.draw(st.sampled_from(KEYS))] = _fresh(data, junk)
    elif op == "number" and isinstance(value, int | float) and not isinstance(value, bool):
        factor = data.draw(st.sampled_from([-1, 0, 0.5, 2, 1000, 1e300, math.inf, math.nan]))
        # an int past float's range (a "special" draw) stays as it is
        with contextlib.suppress(OverflowError):
            parent[key] = value * factor if not isinstance(factor, float) else float(value) * factor
    elif op == "string" and isinstance(value, str) and value:
        i = data.draw(st.integers(0, len(value)))
        parent[key] = data.draw(
            st.sampled_from(
                [value[:i], value[i:], value[:i] + chr(data.draw(st.integers(0, 300))) + value[i:]]
            )
        )
    elif op == "borrow":  # a value of the right type from somewhere else (wrong meaning)
        _, other = data.draw(st.sampled_from(locs))
        parent[key] = copy.deepcopy(other)


def _check_loaded(out: Path) -> None:
    """What loaded must be valid data: the dataset contract of DESIGN.md."""
    for split in SPLITS:
        coco, root, labels = load_split(out, split)
        # skip_crowd=False keeps crowd regions too, so every annotation needs a mask
        masks = all(a.get("segmentation") for a in coco["annotations"])
        ds = DetectionDataset(coco, root, labels, masks=masks, skip_crowd=False)
        for i in range(len(ds)):
            image, target = ds[i]
            _, h, w = image.shape
            boxes = target["boxes"]
            assert boxes.shape == (len(target["labels"]), 4)
            assert bool(boxes.isfinite().all())
            assert bool((boxes[:, 2:] > boxes[:, :2]).all())
            assert bool((boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= w).all())
            assert bool((boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= h).all())
            assert all(1 <= int(v) <= labels.num_classes for v in target["labels"])
            assert bool(target["area"].isfinite().all() and (target["area"] >= 0).all())
            if masks:
                assert tuple(target["masks"].shape) == (len(boxes), h, w)
                assert set(target["masks"].unique().tolist()) <= {0, 1}


def _kind(message: str) -> str:
    """The error's gist without ids and values, for hypothesis' statistics."""
    tail = message.split(": ")[-1] if "image id" not in message else message.split(": ", 2)[-1]
    return " ".join(w for w in tail.split()[:4] if not any(c.isdigit() for c in w))


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_fuzz_coco_reader_loads_valid_data_or_raises_data_error(fuzz_root, data):
    doc = _valid_coco()
    for _ in range(data.draw(st.integers(1, 3))):
        _mutate(doc, data)
    ann = fuzz_root / "annotations.json"
    ann.write_text(json.dumps(doc))
    src = DataParams(
        root=str(fuzz_root),
        train=SplitSource(annotations="annotations.json", images="images"),
        val=None,
    )
    out = fuzz_root / "prepared"
    try:
        prepare(src, PrepareParams(out=str(out), val_fraction=0.34))
    except DataError as e:
        assert "annotations.json" in str(e)
        event(f"refused: {_kind(str(e))}")
        return
    _check_loaded(out)
    event("loaded")


def test_unmutated_fuzz_seed_loads(fuzz_root, tmp_path):
    """The fuzz starts from a valid dataset (else every case would be an error)."""
    (fuzz_root / "annotations.json").write_text(json.dumps(_valid_coco()))
    src = DataParams(
        root=str(fuzz_root),
        train=SplitSource(annotations="annotations.json", images="images"),
        val=None,
    )
    m = prepare(src, PrepareParams(out=str(tmp_path / "p"), val_fraction=0.34))
    assert m["splits"]["train"]["annotations"] + m["splits"]["val"]["annotations"] == 4
    _check_loaded(tmp_path / "p")


def _ann(doc: dict, i: int = 0) -> dict:
    return doc["annotations"][i]


# Inputs that got past the validator before the fuzzer (or review) found them,
# and what they did then: each must now be a DataError naming the record.
FOUND = {
    "area not a number": (  # ValueError in the dataset's float()
        lambda d: _ann(d).update(area="fuzz"),
        "annotation id 1: 'area' must be a number",
    ),
    "negative area": (lambda d: _ann(d).update(area=-1), "'area' must be a number in"),
    "area beyond float32": (  # inf in the dataset's float32 tensor
        lambda d: _ann(d).update(area=8e301),
        "'area' must be a number in",
    ),
    "box too thin for float32": (  # x2 == x1 once float32: torchvision refuses it
        lambda d: _ann(d, 3).update(bbox=[1.5, 2.5, 1e-300, 6]),
        r"annotation id 4: bbox .* has zero or negative size",
    ),
    "box in the tolerance margin": (  # clipped to a negative width
        lambda d: _ann(d, 3).update(bbox=[-0.9, 2, 0.5, 6]),
        "zero or negative size .*once clipped to the image",
    ),
    "NUL in file_name": (  # ValueError from os.path.realpath
        lambda d: d["images"][0].update(file_name="a.png\x00"),
        "image id 1: file_name 'a.png.*' is not a valid path: it contains a NUL",
    ),
    "file_name too long": (  # OSError ENAMETOOLONG from Path.is_file
        lambda d: d["images"][0].update(file_name="x" * 300),
        "image id 1: image file .* File name too long",
    ),
    "malformed compressed RLE": (  # pycocotools decoded it into uninitialised memory
        lambda d: _ann(d, 1).update(segmentation={"size": [24, 32], "counts": "0"}),
        "annotation id 2: RLE 'counts' does not describe a 24x32 mask",
    ),
    "int too big for a float in a bbox": (  # OverflowError in math.isfinite
        lambda d: _ann(d).update(bbox=[10**400, 0, 1, 1]),
        "'bbox' must be 4 finite numbers",
    ),
    "int too big for a float in a polygon": (
        lambda d: _ann(d).update(segmentation=[[10**400, 3, 12, 3, 12, 11]]),
        "polygon 0 has a non-finite coordinate",
    ),
    "annotation id 0": (  # COCOeval reads a matched id 0 as "no match"
        lambda d: _ann(d).update(id=0),
        r"annotations\[0\]: 'id' must be an integer in \[1, 2\*\*63\)",
    ),
    "id beyond int64": (  # RuntimeError making the int64 image_id tensor
        lambda d: d["images"][0].update(id=2**63),
        r"images\[0\]: 'id' must be an integer in \[0, 2\*\*63\)",
    ),
}


@pytest.mark.parametrize("case", sorted(FOUND))
def test_inputs_the_fuzzer_found_are_data_errors(fuzz_root, case):
    edit, message = FOUND[case]
    doc = _valid_coco()
    edit(doc)
    with pytest.raises(DataError, match=message) as err:
        validate_coco(doc, fuzz_root / "annotations.json", fuzz_root / "images")
    assert str(err.value).startswith(str(fuzz_root / "annotations.json"))


@settings(max_examples=150, deadline=None)
@given(cut=st.integers(0, 10_000), junk_bytes=st.binary(max_size=8), at=st.integers(0, 10_000))
def test_fuzz_damaged_json_bytes_raise_data_error(tmp_path_factory, cut, junk_bytes, at):
    text = json.dumps(_valid_coco()).encode()
    text = text[: cut % (len(text) + 1)]
    at = at % (len(text) + 1)
    text = text[:at] + junk_bytes + text[at:]
    path = tmp_path_factory.getbasetemp() / "damaged.json"
    path.write_bytes(text)
    try:
        coco = read_json(path)
    except DataError as e:
        assert str(path) in str(e)
        return
    try:
        validate_coco(coco, path, tmp_path_factory.getbasetemp(), check_files=False)
    except DataError as e:
        assert str(path) in str(e)


@pytest.mark.parametrize(
    "text",
    ["[" * 100_000, "1" * 5000, '{"images": ' + "[" * 50_000, b"\xff\xfe{".decode("latin-1")],
    ids=["deep nesting", "huge int", "deep truncated", "not utf-8"],
)
def test_pathological_json_is_a_data_error(tmp_path, text):
    path = tmp_path / "x.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError, match="x.json: not valid JSON"):
        read_json(path)


# --- image files --------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _raw_png(w: int, h: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written by hand: 16-bit RGB (Pillow cannot write it) or a forged header."""
    header = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows))
        + _chunk(b"IEND", b"")
    )


def _jpeg_bytes(w: int = 64, h: int = 48, mode: str = "RGB", **save) -> bytes:
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, "JPEG", **save)
    return buf.getvalue()


def _grad(h: int, w: int) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) % 256).astype(np.uint8)


def _write_kind(path: Path, kind: str) -> tuple[int, int]:
    """Write one awkward image; returns its (width, height) as displayed."""
    if kind == "grey":
        Image.fromarray(_grad(30, 40), "L").save(path)
    elif kind == "grey16":
        Image.fromarray(_grad(30, 40).astype(np.uint16) * 257).save(path)
    elif kind == "rgb16":
        px = np.zeros((30, 40, 3), ">u2")
        px[..., 0], px[..., 1] = 65535, 32768
        path.write_bytes(_raw_png(40, 30, 16, 2, b"".join(b"\0" + r.tobytes() for r in px)))
    elif kind == "cmyk":
        path.write_bytes(_jpeg_bytes(40, 30, "CMYK"))
    elif kind == "palette":
        im = Image.fromarray(_grad(30, 40), "L").convert("P")
        im.info["transparency"] = 0
        im.save(path)
    elif kind == "rgba":
        Image.fromarray(np.full((30, 40, 4), 200, np.uint8), "RGBA").save(path)
    elif kind == "exif_rotated":  # stored 40x30, orientation 6: displayed 30 wide, 40 high
        exif = Image.Exif()
        exif[0x0112] = 6
        path.write_bytes(_jpeg_bytes(40, 30, exif=exif.tobytes()))
        return 30, 40
    return 40, 30


IMAGE_NAMES = {
    "grey": "g.png",
    "grey16": "g16.png",
    "rgb16": "c16.png",
    "cmyk": "cmyk.jpg",
    "palette": "p.png",
    "rgba": "a.png",
    "exif_rotated": "r.jpg",
}


def _one_image(name: str, w: int, h: int) -> dict:
    return {
        "images": [{"id": 1, "file_name": name, "width": w, "height": h}],
        "categories": [{"id": 1, "name": "x"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10]}],
    }


@pytest.mark.parametrize("kind", sorted(IMAGE_NAMES))
def test_awkward_images_load_as_rgb(tmp_path, kind):
    path = tmp_path / IMAGE_NAMES[kind]
    w, h = _write_kind(path, kind)
    validate_coco(_one_image(path.name, w, h), tmp_path / "ann.json", tmp_path)
    pixels = load_image_array(path)
    assert pixels.dtype == np.uint8 and pixels.shape == (h, w, 3)
    if kind in ("grey", "grey16", "palette"):  # grey stays grey, 16 bit scaled to 8
        assert np.array_equal(pixels[..., 0], pixels[..., 2])
        assert np.array_equal(pixels[..., 0], _grad(30, 40))
    if kind == "rgb16":
        assert pixels[0, 0].tolist() == [255, 128, 0]
    if kind == "exif_rotated":  # the annotation must give the displayed size
        with pytest.raises(DataError, match=r"r.jpg is 30x40 but the annotation says 40x30"):
            validate_coco(_one_image(path.name, 40, 30), tmp_path / "ann.json", tmp_path)


DAMAGED = {
    "truncated jpeg": (lambda: _jpeg_bytes()[:-400], "image file is truncated"),
    "zero-byte file": (lambda: b"", "cannot identify image file"),
    "not an image": (lambda: b"GIF89a" + b"\0" * 20, "unreadable"),
    "corrupt png data": (
        lambda: _raw_png(64, 48, 8, 2, b"\0" * 10),  # far too few rows
        "unreadable",
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_damaged_images_are_refused_naming_the_file(tmp_path, case):
    make, message = DAMAGED[case]
    path = tmp_path / "bad.jpg"
    path.write_bytes(make())
    with pytest.raises(DataError, match="ann.json: image id 1: image .*bad.jpg is unreadable"):
        validate_coco(_one_image("bad.jpg", 64, 48), tmp_path / "ann.json", tmp_path)
    with pytest.raises(DataError, match="bad.jpg: cannot read image") as err:
        load_image_array(path)
    if message != "unreadable":
        assert message in str(err.value)


def test_huge_images_are_refused_before_decoding(tmp_path):
    forged = tmp_path / "bomb.png"  # header says 100000 x 100000, no pixel data
    forged.write_bytes(_raw_png(100_000, 100_000, 8, 2, b""))
    ann = tmp_path / "ann.json"
    with pytest.raises(DataError, match=r"image id 1: 100000x100000 = 10000000000 pixels is above"):
        validate_coco(_one_image("bomb.png", 100_000, 100_000), ann, tmp_path)
    # Declared small, but the header is huge: Pillow's own guard refuses it on opening.
    with pytest.raises(DataError, match=r"image .*bomb.png is unreadable: too many pixels"):
        validate_coco(_one_image("bomb.png", 64, 48), ann, tmp_path)
    with pytest.raises(DataError, match=r"bomb.png: cannot read image: too many pixels"):
        load_image_array(forged)
    # The limit is a parameter: a small one refuses an ordinary image.
    Image.new("RGB", (64, 48)).save(tmp_path / "ok.png")
    with pytest.raises(DataError, match=r"image id 1: 64x48 = 3072 pixels is above the limit"):
        validate_coco(_one_image("ok.png", 64, 48), ann, tmp_path, max_image_pixels=3000)
    # A record declaring fewer pixels than its file has: the file's header is checked too.
    with pytest.raises(DataError, match=r"ok.png is 64x48 = 3072 pixels, above the limit of 3000"):
        validate_coco(_one_image("ok.png", 32, 24), ann, tmp_path, max_image_pixels=3000)
    validate_coco(_one_image("ok.png", 64, 48), ann, tmp_path, max_image_pixels=3072)


def test_max_image_pixels_param_reaches_prepare(tiny_raw, tmp_path):
    raw = yaml.safe_load(TINY_PARAMS)
    assert parse_params(raw).prepare.max_image_pixels == 50_000_000
    p = parse_params(raw | {"prepare": {"max_image_pixels": 1000}})
    for bad in (0, -5, "many", 1.5):
        with pytest.raises(ParamsError, match="prepare.max_image_pixels"):
            parse_params(raw | {"prepare": {"max_image_pixels": bad}})
    data = DataParams(
        root=str(tiny_raw),
        train=SplitSource(annotations="annotations/instances_train.json", images="train"),
        val=SplitSource(annotations="annotations/instances_val.json", images="val"),
    )
    out = tmp_path / "prepared"
    with pytest.raises(DataError, match=r"instances_train.json: image id 1: 64x64 = 4096 pixels"):
        prepare(data, p.prepare.__class__(out=str(out), max_image_pixels=1000))
    assert not out.exists()


def test_truncated_jpeg_stops_prepare_not_training(tiny_raw, tmp_path):
    """A damaged image fails the prepare stage (before hours of training)."""
    ann = tiny_raw / "annotations/instances_train.json"
    coco = json.loads(ann.read_text())
    first = tiny_raw / "train" / coco["images"][0]["file_name"]
    first.write_bytes(first.read_bytes()[:-200])  # a PNG missing its end
    data = DataParams(
        root=str(tiny_raw),
        train=SplitSource(annotations="annotations/instances_train.json", images="train"),
        val=SplitSource(annotations="annotations/instances_val.json", images="val"),
    )
    with pytest.raises(DataError, match=rf"image id 1: image .*{first.name} is unreadable"):
        prepare(data, PrepareParams(out=str(tmp_path / "p")))


# --- damaged prepared and proposal files ----------------------------------------------------

SEARCH = SearchSettings(  # as TINY_PARAMS
    mode="fast", max_boxes=200, min_size=6, max_side=ProposalsParams().max_side
)
PREPARE_HINT = "rebuild it with `dvc repro prepare` (or `rcnnops prepare`)"
PROPOSALS_HINT = "rebuild them with `dvc repro proposals` (or `rcnnops proposals`)"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """Prepared data and proposals written once by the real stage functions."""
    root = tmp_path_factory.mktemp("built")
    raw = generate(TINY.model_copy(update=dict(out=str(root / "raw"), num_train=6, num_val=3)))
    data = DataParams(
        root=str(raw),
        train=SplitSource(annotations="annotations/instances_train.json", images="train"),
        val=SplitSource(annotations="annotations/instances_val.json", images="val"),
    )
    prepare(data, PrepareParams(out=str(root / "prepared")))
    precompute(root / "prepared", root / "proposals", SEARCH, workers=1)
    return root


@pytest.fixture
def scratch(built, tmp_path) -> Path:
    """A private copy of ``built`` to damage."""
    for name in ("prepared", "proposals"):
        shutil.copytree(built / name, tmp_path / name)
    return tmp_path


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _edit_json(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


PREPARED_DAMAGE = {
    "train.json truncated": (
        lambda d: _truncate(d / "train.json"),
        r"train.json: checksum does not match .*manifest.json",
    ),
    "val.json edited": (
        lambda d: _edit_json(d / "val.json", lambda c: c["annotations"].clear()),
        r"val.json: checksum does not match",
    ),
    "train.json deleted": (lambda d: (d / "train.json").unlink(), r"train.json: prepared file not"),
    "labels.json truncated": (
        lambda d: _truncate(d / "labels.json"),
        r"labels.json: checksum does not match",
    ),
    "manifest.json truncated": (
        lambda d: _truncate(d / "manifest.json"),
        r"manifest.json: not valid JSON",
    ),
    "manifest.json not an object": (
        lambda d: (d / "manifest.json").write_text("[]"),
        r"manifest.json: corrupt or edited by hand: not a JSON object",
    ),
    "manifest.json hash edited": (
        lambda d: _edit_json(d / "manifest.json", lambda m: m.update(data_hash="0" * 64)),
        r"manifest.json: corrupt or edited by hand: 'data_hash' does not match",
    ),
    "manifest.json split hash edited": (
        lambda d: _edit_json(
            d / "manifest.json", lambda m: m["splits"]["val"].update(hash="1" * 64)
        ),
        r"manifest.json: corrupt or edited by hand: 'data_hash' does not match",
    ),
    "manifest.json without checksums": (
        lambda d: _edit_json(d / "manifest.json", lambda m: m.pop("files")),
        r"manifest.json: corrupt or edited by hand: 'splits' or 'files' missing",
    ),
    "manifest.json deleted": (
        lambda d: (d / "manifest.json").unlink(),
        r"manifest.json: prepared data not found",
    ),
    "manifest.json not utf-8": (
        lambda d: (d / "manifest.json").write_bytes(b"\xff\xfe\x00{"),
        r"manifest.json: not valid JSON",
    ),
}


@pytest.mark.parametrize("case", sorted(PREPARED_DAMAGE))
def test_damaged_prepared_files_name_the_file_and_the_fix(scratch, case):
    damage, message = PREPARED_DAMAGE[case]
    damage(scratch / "prepared")
    hit = [s for s in SPLITS if case.startswith(f"{s}.json")] or list(SPLITS)
    for split in SPLITS:
        if split not in hit:
            load_split(scratch / "prepared", split)  # the other split is intact
            continue
        with pytest.raises(DataError, match=message) as err:
            load_split(scratch / "prepared", split)
        assert str(err.value).endswith(PREPARE_HINT)


def test_manifest_from_before_labels_were_checksummed_still_loads(scratch):
    _edit_json(scratch / "prepared" / "manifest.json", lambda m: m["files"].pop("labels.json"))
    coco, _, labels = load_split(scratch / "prepared", "train")
    assert labels.num_classes == 3 and coco["images"]
    (scratch / "prepared" / "labels.json").write_text('{"labels": 5}')
    with pytest.raises(DataError, match=r"labels.json: not a label map .*dvc repro prepare"):
        load_split(scratch / "prepared", "train")


def _store(folder: Path, **kw) -> ProposalStore:
    return ProposalStore(folder / "proposals" / "val", SEARCH, **kw)


PROPOSAL_DAMAGE = {
    "boxes.npy truncated": (lambda d: _truncate(d / "boxes.npy"), r"boxes.npy: checksum mismatch"),
    "scores.npy bit flipped": (
        lambda d: (d / "scores.npy").write_bytes(
            (b := bytearray((d / "scores.npy").read_bytes())) and bytes(b[:-1]) + bytes([b[-1] ^ 1])
        ),
        r"scores.npy: checksum mismatch",
    ),
    "boxes.npy deleted": (lambda d: (d / "boxes.npy").unlink(), r"boxes.npy: missing"),
    "index.json truncated": (lambda d: _truncate(d / "index.json"), r"index.json: corrupt"),
    "index.json binary": (
        lambda d: (d / "index.json").write_bytes(b"\x89\xff\x00garbage"),
        r"index.json: corrupt",
    ),
    "index.json not an index": (
        lambda d: (d / "index.json").write_text('{"images": []}'),
        r"index.json: corrupt \(not a proposals index\)",
    ),
    "index.json checksum removed": (
        lambda d: _edit_json(d / "index.json", lambda i: i["checksums"].pop("boxes.npy")),
        r"boxes.npy: checksum mismatch",
    ),
    "index.json rows out of range": (
        lambda d: _edit_json(
            d / "index.json", lambda i: i["images"].update({k: [0, 10**6] for k in i["images"]})
        ),
        r"index.json: image id \d+: rows \[0, 1000000\] are not within",
    ),
    "index.json deleted": (lambda d: (d / "index.json").unlink(), r"index.json: proposals not"),
}


@pytest.mark.parametrize("case", sorted(PROPOSAL_DAMAGE))
def test_damaged_proposal_files_name_the_file_and_the_fix(scratch, case):
    damage, message = PROPOSAL_DAMAGE[case]
    damage(scratch / "proposals" / "val")
    with pytest.raises(ProposalError, match=message) as err:
        _store(scratch)
    assert str(err.value).endswith(PROPOSALS_HINT)
    params = SimpleNamespace(
        prepare=SimpleNamespace(out=str(scratch / "prepared")),
        proposals=SimpleNamespace(out=str(scratch / "proposals"), **SEARCH.as_dict()),
    )
    with pytest.raises(ProposalError, match=message):
        open_store(params, "val")  # what train and evaluate call: checks the sums
    ProposalStore(scratch / "proposals" / "train", SEARCH)  # the other split is intact


def test_unverified_truncated_proposals_are_still_refused(scratch):
    """``verify=False`` skips the sha256; the arrays' own shapes still catch truncation."""
    folder = scratch / "proposals" / "val"
    _truncate(folder / "boxes.npy")
    with pytest.raises(ProposalError, match=r"val: unreadable proposals .*dvc repro proposals"):
        ProposalStore(folder, SEARCH, verify=False)
    assert len(ProposalStore(scratch / "proposals" / "train", SEARCH, verify=False).boxes) > 0


@pytest.mark.parametrize(
    ("variant", "damage", "message"),
    [
        (
            "faster_rcnn",
            "prepared/manifest.json",
            r"manifest.json: not valid JSON.*dvc repro prepare",
        ),
        ("faster_rcnn", "prepared/train.json", r"train.json: checksum does not match"),
        (
            "rcnn",
            "proposals/train/boxes.npy",
            r"boxes.npy: checksum mismatch .*dvc repro proposals",
        ),
    ],
)
def test_stage_commands_report_damage_in_one_line(
    built, tmp_path, capsys, variant, damage, message
):
    """`rcnnops train` (what `dvc repro train@...` runs) on damaged inputs: exit 2
    and one line naming the file and the fix, no traceback."""
    project = tmp_path / "project"
    for name in ("prepared", "proposals"):
        shutil.copytree(built / name, project / "data" / name)
    (project / "params.yaml").write_text(TINY_PARAMS)
    _truncate(project / "data" / damage)
    assert cli.main(["-C", str(project), "train", "--variant", variant]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err
    assert err.startswith("rcnnops train: error: data/") and len(err.strip().splitlines()) == 1
    assert not (project / "models" / variant / "model.pt").exists()
