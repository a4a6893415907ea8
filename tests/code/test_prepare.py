"""prepare: validation of every bad input, contiguous labels, atomic outputs."""

import json
import os

import pytest

from rcnnops.config import DataParams, PrepareParams, SplitSource
from rcnnops.data.dataset import LabelMap
from rcnnops.data.io import DataError
from rcnnops.data.prepare import load_split, prepare, split_train_val

ANN = "annotations/instances_train.json"


def _data(root, val=True):
    return DataParams(
        root=str(root),
        train=SplitSource(annotations=ANN, images="train"),
        val=SplitSource(annotations="annotations/instances_val.json", images="val")
        if val
        else None,
    )


def _edit(root, fn):
    path = root / ANN
    coco = json.loads(path.read_text())
    fn(coco)
    path.write_text(json.dumps(coco))
    return coco


def test_prepare_writes_contiguous_labels_and_hashes(tiny_raw, tmp_path):
    m = prepare(_data(tiny_raw), PrepareParams(out=str(tmp_path / "p")))
    labels = json.loads((tmp_path / "p" / "labels.json").read_text())
    assert [r["label"] for r in labels["labels"]] == [1, 2, 3]
    assert [r["name"] for r in labels["labels"]] == ["circle", "square", "triangle"]
    assert m["splits"]["train"]["images"] == 12 and m["splits"]["val"]["images"] == 6
    coco, root, lm = load_split(tmp_path / "p", "val")
    assert lm.num_classes == 3 and (root / coco["images"][0]["file_name"]).is_file()
    # Same input -> same hash; a changed image -> another hash.
    again = prepare(_data(tiny_raw), PrepareParams(out=str(tmp_path / "q")))
    assert again["data_hash"] == m["data_hash"]
    img = next((tiny_raw / "val").glob("*.png"))
    img.write_bytes(img.read_bytes())  # same bytes: unchanged
    assert (
        prepare(_data(tiny_raw), PrepareParams(out=str(tmp_path / "r")))["val_hash"]
        == m["val_hash"]
    )


def test_label_map_round_trip():
    lm = LabelMap.from_categories([{"id": 90, "name": "b"}, {"id": 3, "name": "a"}])
    assert lm.label(3) == 1 and lm.label(90) == 2 and lm.category_id(2) == 90
    assert LabelMap.from_json(lm.to_json()) == lm


def test_split_is_deterministic_and_disjoint(tiny_raw):
    coco = json.loads((tiny_raw / ANN).read_text())
    a_train, a_val = split_train_val(coco, 0.25, seed=0)
    b_train, b_val = split_train_val(coco, 0.25, seed=0)
    assert a_val == b_val and len(a_val["images"]) == 3
    ids = {i["id"] for i in a_train["images"]} | {i["id"] for i in a_val["images"]}
    assert len(ids) == 12
    assert all(a["image_id"] in {i["id"] for i in a_val["images"]} for a in a_val["annotations"])


def test_prepare_without_val_splits_train(tiny_raw, tmp_path):
    m = prepare(
        _data(tiny_raw, val=False), PrepareParams(out=str(tmp_path / "p"), val_fraction=0.25)
    )
    assert m["splits"]["val"]["images"] == 3 and m["splits"]["train"]["images"] == 9


def _first_ann(c):
    return c["annotations"][0]


BAD = {
    "missing key": (lambda c: c.pop("categories"), "missing required key 'categories'"),
    "zero-size box": (
        lambda c: _first_ann(c).update(bbox=[1, 1, 0, 5]),
        r"annotation id 1: bbox \[1, 1, 0, 5\] has zero or negative size",
    ),
    "negative box": (
        lambda c: _first_ann(c).update(bbox=[1, 1, 5, -2]),
        "annotation id 1: .* zero or negative size",
    ),
    "box outside": (
        lambda c: _first_ann(c).update(bbox=[50, 50, 40, 10]),
        "annotation id 1: bbox .* lies outside image id",
    ),
    "unknown category": (
        lambda c: _first_ann(c).update(category_id=77),
        "annotation id 1: unknown category_id 77",
    ),
    "duplicate image id": (
        lambda c: c["images"].append(dict(c["images"][0])),
        "image id 1: duplicate image id",
    ),
    "duplicate annotation id": (
        lambda c: c["annotations"].append(dict(_first_ann(c))),
        "annotation id 1: duplicate annotation id",
    ),
    "unknown image id": (
        lambda c: _first_ann(c).update(image_id=999),
        "annotation id 1: image_id 999 is not in 'images'",
    ),
    "path escape": (
        lambda c: c["images"][0].update(file_name="../../etc/passwd"),
        "image id 1: file_name '../../etc/passwd' escapes the image folder",
    ),
    "absolute path": (
        lambda c: c["images"][0].update(file_name="/etc/passwd"),
        "image id 1: file_name '/etc/passwd' escapes",
    ),
    "missing image": (
        lambda c: c["images"][0].update(file_name="nope.png"),
        r"image id 1: image file .*nope.png not found",
    ),
    "bad bbox type": (
        lambda c: _first_ann(c).update(bbox="1,2,3,4"),
        "annotation id 1: 'bbox' must be 4 finite numbers",
    ),
    "one file, two images": (  # listed twice: counted twice, and split to train and val
        lambda c: c["images"].append(dict(c["images"][0], id=999)),
        r"image id 999: file_name '.*\.png' is image id 1's file too; .* list it once",
    ),
    "one file, two names": (
        lambda c: c["images"].append(
            dict(c["images"][0], id=999, file_name="./" + c["images"][0]["file_name"])
        ),
        r"image id 999: file_name '\./.*' is image id 1's file too",
    ),
    "wrong size": (
        lambda c: c["images"][0].update(width=99),
        "image id 1: .* is 64x64 but the annotation says 99x64",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_file_and_record_and_writes_nothing(tiny_raw, tmp_path, case):
    edit, message = BAD[case]
    _edit(tiny_raw, edit)
    out = tmp_path / "prepared"
    with pytest.raises(DataError, match=message) as err:
        prepare(_data(tiny_raw), PrepareParams(out=str(out)))
    assert "instances_train.json" in str(err.value)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prepare-")]


def test_a_size_of_the_stored_pixels_of_a_turned_photo_says_why(tiny_raw, tmp_path):
    """A phone photo stored 64x48 with an EXIF orientation that shows it 48x64, and a
    record of the stored size: refused, saying that photos are read as shown."""
    from PIL import Image

    coco = _edit(tiny_raw, lambda c: c["images"][0].update(width=64, height=48))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees
    Image.new("RGB", (64, 48), "grey").save(
        tiny_raw / "train" / coco["images"][0]["file_name"], exif=exif
    )
    with pytest.raises(DataError, match=(
        r"image id 1: .* is 48x64 but the annotation says 64x48 \(its pixels are stored at "
        r"that size, but its EXIF orientation turns the photo: .*as shown\)"
    )):  # fmt: skip
        prepare(_data(tiny_raw), PrepareParams(out=str(tmp_path / "prepared")))
    coco["images"][0].update(width=48, height=64)  # a size that is simply wrong: no hint
    (tiny_raw / ANN).write_text(json.dumps(coco))
    Image.new("RGB", (64, 64), "grey").save(tiny_raw / "train" / coco["images"][0]["file_name"])
    with pytest.raises(DataError, match=r"is 64x64 but the annotation says 48x64$"):
        prepare(_data(tiny_raw), PrepareParams(out=str(tmp_path / "prepared")))


def test_a_photo_in_both_splits_is_refused(tiny_raw, tmp_path):
    """A val file naming a photo the train file names (one image folder for both):
    the model would be validated on what it trained on."""
    train = json.loads((tiny_raw / ANN).read_text())
    shared = dict(train["images"][1], id=5000)
    val = {"images": [shared], "annotations": [], "categories": train["categories"]}
    (tiny_raw / "annotations/instances_shared.json").write_text(json.dumps(val))
    data = DataParams(
        root=str(tiny_raw),
        train=SplitSource(annotations=ANN, images="train"),
        val=SplitSource(annotations="annotations/instances_shared.json", images="train"),
    )
    out = tmp_path / "prepared"
    with pytest.raises(DataError, match=(
        r"instances_shared.json: image id 5000 \('.*\.png'\) is also in the train split "
        rf"\(image id {train['images'][1]['id']} of .*instances_train"
        r".json\): .*keep it in one split"
    )):  # fmt: skip
        prepare(data, PrepareParams(out=str(out)))
    assert not out.exists()


def test_bad_input_keeps_previous_outputs(tiny_raw, tmp_path):
    out = tmp_path / "prepared"
    prepare(_data(tiny_raw), PrepareParams(out=str(out)))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _edit(tiny_raw, lambda c: _first_ann(c).update(category_id=77))
    with pytest.raises(DataError):
        prepare(_data(tiny_raw), PrepareParams(out=str(out)))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_not_json(tiny_raw, tmp_path):
    (tiny_raw / ANN).write_text("{not json")
    with pytest.raises(DataError, match=r"instances_train.json: not valid JSON"):
        prepare(_data(tiny_raw), PrepareParams(out=str(tmp_path / "p")))


def test_unreadable_image(tiny_raw, tmp_path):
    coco = json.loads((tiny_raw / ANN).read_text())
    (tiny_raw / "train" / coco["images"][0]["file_name"]).write_bytes(b"not an image")
    with pytest.raises(DataError, match="image id 1: image .* is unreadable"):
        prepare(_data(tiny_raw), PrepareParams(out=str(tmp_path / "p")))


def test_symlink_escape(tiny_raw, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes((tiny_raw / "train" / "000001.png").read_bytes())
    os.symlink(secret, tiny_raw / "train" / "link.png")
    _edit(tiny_raw, lambda c: c["images"][0].update(file_name="link.png"))
    with pytest.raises(DataError, match="resolves outside the image folder"):
        prepare(_data(tiny_raw), PrepareParams(out=str(tmp_path / "p")))


def test_drop_degenerate_counts_what_it_drops(tiny_raw, tmp_path):
    coco = _edit(tiny_raw, lambda c: [a.update(bbox=[1, 1, 0, 0]) for a in c["annotations"][:2]])
    m = prepare(_data(tiny_raw), PrepareParams(out=str(tmp_path / "p"), drop_degenerate=True))
    rep = m["validation"]["train"]
    assert rep["dropped_degenerate"] == 2 and rep["dropped_ids"] == [1, 2]
    assert m["splits"]["train"]["annotations"] == len(coco["annotations"]) - 2


def test_small_overhang_is_clipped_and_counted(tiny_raw, tmp_path):
    _edit(tiny_raw, lambda c: _first_ann(c).update(bbox=[-0.5, 2, 10, 10]))
    m = prepare(_data(tiny_raw), PrepareParams(out=str(tmp_path / "p")))
    assert m["validation"]["train"]["clipped"] == 1
    coco, _, _ = load_split(tmp_path / "p", "train")
    assert coco["annotations"][0]["bbox"] == [0.0, 2.0, 9.5, 10.0]


def test_empty_polygon_list_is_a_box_only_annotation(tiny_raw, tmp_path, capsys):
    """``"segmentation": [[]]`` is how several converters write a box-only object:
    read as ``[]`` (as an absent segmentation is), counted and said; an empty
    polygon beside real ones is still an error."""
    from rcnnops.config import Params
    from rcnnops.data.prepare import run

    def box_only(c):
        for a in c["annotations"][:3]:
            a["segmentation"] = [[]]
        c["annotations"][3]["segmentation"] = [[], []]

    _edit(tiny_raw, box_only)
    params = Params(data=_data(tiny_raw), prepare=PrepareParams(out=str(tmp_path / "p")))
    m = run(params)
    assert m["validation"]["train"]["empty_polygons"] == 4
    assert "annotations, 4 box-only ('segmentation': [[]])\n" in capsys.readouterr().out
    coco, _, _ = load_split(tmp_path / "p", "train")
    assert [a["segmentation"] for a in coco["annotations"][:4]] == [[], [], [], []]
    assert all(a["segmentation"] for a in coco["annotations"][4:])
    _edit(tiny_raw, lambda c: c["annotations"][0].update(segmentation=[[], [1, 1, 5, 1, 5, 5]]))
    with pytest.raises(DataError, match=r"annotation id 1: segmentation polygon 0 has 0 coord"):
        prepare(_data(tiny_raw), PrepareParams(out=str(tmp_path / "p")))


def test_corrupt_prepared_file_is_detected(tiny_prepared):
    path = tiny_prepared / "train.json"
    path.write_text(path.read_text()[:-20])
    with pytest.raises(DataError, match="checksum does not match .* `dvc repro prepare`"):
        load_split(tiny_prepared, "train")


def test_a_fifo_in_place_of_an_image_is_refused_not_waited_on(tmp_path):
    """`compare --plot` hung for good on a named pipe where a photo belonged."""
    import threading

    from rcnnops.data.io import load_image_array

    fifo = tmp_path / "000001.png"
    os.mkfifo(fifo)
    caught = []
    reader = threading.Thread(target=lambda: caught.append(_raised(load_image_array, fifo)),
                              daemon=True)  # fmt: skip
    reader.start()
    reader.join(timeout=10)
    assert caught and f"{fifo}: cannot read image: not a regular file" in caught[0]


def _raised(fn, *args) -> str:
    try:
        fn(*args)
    except DataError as e:
        return str(e)
    return "no error"
