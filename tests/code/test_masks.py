"""Instance masks through the data path: COCO polygons / RLE / crowd against
pycocotools, validation of bad segmentations, the dataset's masks and flips."""

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from rcnnops.config import PrepareParams
from rcnnops.data.dataset import DetectionDataset, LabelMap
from rcnnops.data.io import DataError
from rcnnops.data.masks import check_segmentation, decode, encode, to_rle
from rcnnops.data.prepare import load_split, prepare
from rcnnops.data.transforms import RandomHorizontalFlip
from rcnnops.data.validate import validate_coco
from tests.code.test_prepare import ANN, _data, _edit

W, H = 40, 30
SQUARE = [10, 5, 20, 5, 20, 15, 10, 15]
TRIANGLE = [25, 20, 35, 20, 30, 28]


def _reference(seg) -> np.ndarray:
    """pycocotools' own annToMask, the reference for our conversion."""
    coco = COCO()
    coco.dataset = {
        "images": [{"id": 1, "width": W, "height": H}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": seg}],
        "categories": [{"id": 1, "name": "x"}],
    }
    coco.createIndex()
    return coco.annToMask(coco.anns[1])


def _uncompressed(mask: np.ndarray) -> dict:
    """Crowd-style RLE: run lengths over the column-major pixels, starting with 0s."""
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


@pytest.mark.parametrize(
    "seg",
    [[SQUARE], [SQUARE, TRIANGLE]],  # one polygon; a two-part object
    ids=["polygon", "multi-part"],
)
def test_polygons_decode_like_pycocotools(seg):
    ours = decode(seg, W, H)
    assert ours.dtype == np.uint8 and ours.shape == (H, W)
    assert np.array_equal(ours, _reference(seg))
    assert ours[10, 15] == 1 and ours[0, 0] == 0
    if len(seg) == 2:
        assert ours[22, 30] == 1  # the second part is in the same mask


def test_rle_round_trips_uncompressed_and_compressed():
    mask = np.zeros((H, W), np.uint8)
    mask[3:12, 4:30] = 1
    mask[20:25, 2:6] = 1
    crowd = _uncompressed(mask)
    assert np.array_equal(decode(crowd, W, H), mask)
    assert np.array_equal(decode(crowd, W, H), _reference(crowd))
    rle = encode(mask)
    assert isinstance(rle["counts"], str) and rle["size"] == [H, W]
    json.dumps(rle)  # JSON-ready
    assert np.array_equal(decode(rle, W, H), mask)
    assert int(mask_utils.area(to_rle(rle, W, H))) == int(mask.sum())


@pytest.mark.parametrize(
    ("seg", "message"),
    [
        ([[1, 1, 5, 5]], "needs at least 3"),
        ([[1, 1, 5, 5, 9]], "needs at least 3"),
        ([[1, 1, 5, 5, "a", 2]], "list of numbers"),
        ([[1, 1, 5, 5, float("nan"), 2]], "non-finite"),
        ([[1, 1, 60, 5, 9, 9]], "outside the image"),
        ({"size": [W, H], "counts": [W * H]}, "does not match the image"),
        ({"size": [H, W], "counts": [5, 5]}, "cover 10 pixels"),
        ({"size": [H, W], "counts": "!!not-rle"}, "cannot be decoded|does not describe"),
        ({"size": [H, W]}, "'counts'"),
        ("polygon", "must be polygons"),
    ],
)
def test_bad_segmentations_are_named(seg, message):
    with pytest.raises(DataError, match=message) as e:
        check_segmentation(seg, W, H, "f.json: annotation id 7")
    assert "f.json: annotation id 7" in str(e.value)


@pytest.mark.parametrize(
    ("seg", "message"),
    [
        ([[1, 2, 3, 4]], "needs at least 3"),
        ({"size": [1, 1], "counts": [1]}, "does not match the image"),
        ([[0, 0, 500, 0, 500, 500]], "outside the image"),
    ],
)
def test_prepare_refuses_bad_segmentation_and_writes_nothing(tiny_raw, tmp_path, seg, message):
    coco = _edit(tiny_raw, lambda c: c["annotations"][0].update(segmentation=seg))
    aid = coco["annotations"][0]["id"]
    out = tmp_path / "p"
    with pytest.raises(DataError, match=message) as e:
        prepare(_data(tiny_raw), PrepareParams(out=str(out)))
    assert ANN in str(e.value) and f"annotation id {aid}" in str(e.value)
    assert not out.exists()


def test_dataset_masks_match_annotations_and_skip_crowd(tiny_prepared):
    coco, root, labels = load_split(tiny_prepared, "train")
    # Mark one object as a crowd region (RLE, as COCO stores crowds).
    a = next(a for a in coco["annotations"])
    im = next(i for i in coco["images"] if i["id"] == a["image_id"])
    crowd_mask = decode(a["segmentation"], im["width"], im["height"])
    a.update(iscrowd=1, segmentation=_uncompressed(crowd_mask))
    ds = DetectionDataset(coco, root, labels, masks=True)
    for i in range(len(ds)):
        image, target = ds[i]
        anns = [x for x in coco["annotations"] if x["image_id"] == ds.images[i]["id"]]
        kept = [x for x in anns if not x["iscrowd"]]
        assert target["masks"].shape == (len(kept), *image.shape[1:])
        assert target["masks"].dtype == torch.uint8
        for m, ann in zip(target["masks"], kept, strict=True):
            x, y, w, h = ann["bbox"]
            ys, xs = np.nonzero(m.numpy())
            # The mask lies inside its box and fills most of it (shapes are solid).
            assert xs.min() >= int(x) - 1 and xs.max() <= x + w and ys.max() <= y + h
            assert m.sum() > 0.3 * w * h


def test_flip_moves_masks_with_boxes():
    image = torch.zeros(3, 8, 10)
    masks = torch.zeros(1, 8, 10, dtype=torch.uint8)
    masks[0, 2:5, 1:3] = 1
    target = {"boxes": torch.tensor([[1.0, 2.0, 3.0, 5.0]]), "masks": masks}
    torch.manual_seed(0)
    _, out = RandomHorizontalFlip(1.0)(image, target)
    assert out["boxes"].tolist() == [[7.0, 2.0, 9.0, 5.0]]
    ys, xs = np.nonzero(out["masks"][0].numpy())
    assert xs.min() == 7 and xs.max() == 8 and ys.min() == 2 and ys.max() == 4


def test_mask_variant_needs_segmentation(tiny_prepared):
    coco, root, labels = load_split(tiny_prepared, "train")
    coco["annotations"][0].pop("segmentation")
    with pytest.raises(DataError, match="no 'segmentation'"):
        DetectionDataset(coco, root, labels, masks=True)
    DetectionDataset(coco, root, labels)  # box-only variants do not need masks


def test_empty_segmentation_means_box_only(tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (W, H)).save(tmp_path / "img" / "a.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": W, "height": H}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "segmentation": []}
        ],
        "categories": [{"id": 1, "name": "x"}],
    }
    cleaned, _ = validate_coco(coco, tmp_path / "a.json", tmp_path / "img")
    assert cleaned["annotations"][0]["segmentation"] == []
    with pytest.raises(DataError, match="no 'segmentation'"):
        DetectionDataset(cleaned, tmp_path / "img", LabelMap((1,), ("x",)), masks=True)
