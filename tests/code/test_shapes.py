import hashlib
import json

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from rcnnops.data.shapes import generate
from tests.conftest import TINY


def _digest(root):
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def test_generator_is_deterministic(tmp_path):
    a = generate(TINY.model_copy(update=dict(out=str(tmp_path / "a"))))
    b = generate(TINY.model_copy(update=dict(out=str(tmp_path / "b"))))
    c = generate(TINY.model_copy(update=dict(out=str(tmp_path / "c"), seed=2)))
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_coco_round_trip(tiny_raw):
    """pycocotools reads what we write; polygons, boxes and areas agree."""
    for split, n in (("train", TINY.num_train), ("val", TINY.num_val)):
        coco = COCO(str(tiny_raw / "annotations" / f"instances_{split}.json"))
        assert len(coco.getImgIds()) == n
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == TINY.classes
        for ann in coco.loadAnns(coco.getAnnIds()):
            img = coco.imgs[ann["image_id"]]
            assert (tiny_raw / split / img["file_name"]).is_file()
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= img["width"] and y + h <= img["height"]
            m = coco.annToMask(ann)
            assert m.shape == (img["height"], img["width"])
            # The polygon rasterises back to the visible mask the box came from.
            bx = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(m)))
            assert bx.tolist() == [x, y, w, h]
            assert abs(int(m.sum()) - ann["area"]) <= 0.02 * ann["area"] + 2


def test_some_images_have_no_objects(tmp_path):
    out = generate(TINY.model_copy(update=dict(out=str(tmp_path / "e"), empty_fraction=1.0)))
    coco = json.loads((out / "annotations" / "instances_train.json").read_text())
    assert coco["annotations"] == [] and len(coco["images"]) == TINY.num_train


def test_annotation_files_are_what_json_dumps_of_the_whole_dataset_writes(tiny_raw, tmp_path):
    """The COCO files are written record by record as they are made (memory flat
    in the image count); they are byte for byte ``json.dumps`` of the whole dict,
    as when the dict was built first, so no dataset hash changed. Also with an
    empty annotation list, and no spool file is left beside them."""
    empty = generate(TINY.model_copy(update=dict(out=str(tmp_path / "e"), empty_fraction=1.0)))
    for root in (tiny_raw, empty):
        files = sorted(p.name for p in (root / "annotations").iterdir())
        assert files == ["instances_train.json", "instances_val.json"]
        for name in files:
            text = (root / "annotations" / name).read_text()
            assert json.dumps(json.loads(text)) == text
    assert '"annotations": []' in (empty / "annotations" / "instances_train.json").read_text()
