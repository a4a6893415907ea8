"""Evaluation exactness through our COCO code (pycocotools underneath)."""

import json

import pytest
import torch

from rcnnops.data.masks import decode, encode
from rcnnops.data.prepare import load_split
from rcnnops.evaluate import summarise
from rcnnops.metrics import coco_evaluate, to_coco_results
from rcnnops.plots import plot_pr


def _gt_as_results(coco, masks=False):
    sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    out = []
    for a in coco["annotations"]:
        if a.get("iscrowd", 0):
            continue
        r = {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"]}
        if masks:  # as a model would give them: binary masks encoded as RLE
            r["segmentation"] = encode(decode(a["segmentation"], *sizes[a["image_id"]]))
        out.append(r | {"score": 1.0})
    return out


def test_ground_truth_as_predictions_gives_ap_1(tiny_prepared):
    coco, _, _ = load_split(tiny_prepared, "val")
    stats, per_class, _ = coco_evaluate(coco, _gt_as_results(coco))
    assert stats["bbox_AP"] == pytest.approx(1.0)
    assert stats["bbox_AP50"] == pytest.approx(1.0)
    assert stats["bbox_AR100"] == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in per_class.values() if v == v)


def test_no_predictions_gives_zero(tiny_prepared):
    coco, _, _ = load_split(tiny_prepared, "val")
    stats, per_class, _ = coco_evaluate(coco, [])
    assert stats["bbox_AP"] == 0.0 and stats["bbox_AP50"] == 0.0 and stats["bbox_AR100"] == 0.0
    assert all(v == 0.0 for v in per_class.values() if v == v)


def test_shifted_boxes_lose_strict_iou(tiny_prepared):
    coco, _, _ = load_split(tiny_prepared, "val")
    res = _gt_as_results(coco)
    for r in res:  # IoU of a box shifted by 20 % of its width ~ 0.67: counts at .5, not .75
        x, y, w, h = r["bbox"]
        r["bbox"] = [x + 0.2 * w, y, w, h]
    stats, _, _ = coco_evaluate(coco, res)
    assert stats["bbox_AP50"] == pytest.approx(1.0)
    assert stats["bbox_AP75"] == pytest.approx(0.0)


def test_to_coco_results_converts_xyxy_to_xywh_and_category_ids(tiny_prepared):
    _, _, labels = load_split(tiny_prepared, "val")
    out = {
        "boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]]),
        "labels": torch.tensor([2]),
        "scores": torch.tensor([0.9]),
    }
    (r,) = to_coco_results(7, out, labels)
    assert r == {
        "image_id": 7,
        "category_id": labels.category_id(2),
        "bbox": [10.0, 20.0, 20.0, 40.0],
        "score": 0.9,
    }


def test_report_files(tiny_prepared, tmp_path):
    coco, _, labels = load_split(tiny_prepared, "val")
    results = _gt_as_results(coco, masks=True)
    evals, curves = {}, {}
    for t in ("bbox", "segm"):
        stats, per_class, curves[t] = coco_evaluate(coco, results, t)
        evals[t] = (stats, per_class)
    metrics = summarise(evals, 12.5)
    plot_pr(curves, labels.names, tmp_path / "pr.png", "test")
    assert (tmp_path / "pr.png").stat().st_size > 1000
    doc = json.loads(json.dumps(metrics, allow_nan=False))
    assert doc["infer_ms_per_image"] == 12.5
    assert doc["bbox_AP"] == pytest.approx(1.0) and doc["segm_AP"] == pytest.approx(1.0)
    assert set(doc["per_class_AP"]) == set(labels.names) == set(doc["per_class_segm_AP"])


def test_ground_truth_masks_as_predictions_give_segm_ap_1(tiny_prepared):
    coco, _, _ = load_split(tiny_prepared, "val")
    stats, per_class, _ = coco_evaluate(coco, _gt_as_results(coco, masks=True), "segm")
    assert stats["segm_AP"] == pytest.approx(1.0) and stats["segm_AR100"] == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in per_class.values() if v == v)


def test_segm_is_judged_by_the_mask_not_the_box(tiny_prepared):
    """Right boxes with masks shrunk to a quarter of each object: box AP stays 1,
    mask IoU drops below .5, so segm AP50 is 0."""
    coco, _, _ = load_split(tiny_prepared, "val")
    results = _gt_as_results(coco, masks=True)
    for r in results:
        m = decode(r["segmentation"], 64, 64)
        ys, xs = m.nonzero()
        keep = (ys < (ys.min() + ys.max()) / 2) & (xs < (xs.min() + xs.max()) / 2)
        small = m * 0
        small[ys[keep], xs[keep]] = 1
        r["segmentation"] = encode(small)
    assert coco_evaluate(coco, results, "bbox")[0]["bbox_AP"] == pytest.approx(1.0)
    assert coco_evaluate(coco, results, "segm")[0]["segm_AP50"] == pytest.approx(0.0)


def test_crowd_regions_are_ignored_not_missed(tiny_prepared):
    """A crowd ground truth is neither a miss nor does a detection on it count
    as a false positive (COCOeval's iscrowd handling)."""
    coco, _, _ = load_split(tiny_prepared, "val")
    crowd = coco["annotations"][0]
    crowd["iscrowd"] = 1
    results = _gt_as_results(coco, masks=True)
    results.append(
        {
            "image_id": crowd["image_id"],
            "category_id": crowd["category_id"],
            "bbox": crowd["bbox"],
            "segmentation": encode(decode(crowd["segmentation"], 64, 64)),
            "score": 1.0,
        }
    )
    for t in ("bbox", "segm"):
        assert coco_evaluate(coco, results, t)[0][f"{t}_AP"] == pytest.approx(1.0)


def test_to_coco_results_encodes_masks_at_half_probability(tiny_prepared):
    _, _, labels = load_split(tiny_prepared, "val")
    masks = torch.zeros(1, 1, 6, 8)
    masks[0, 0, 1:3, 2:5] = 0.9
    masks[0, 0, 4, 4] = 0.4  # below 0.5: background
    out = {
        "boxes": torch.tensor([[2.0, 1.0, 5.0, 3.0]]),
        "labels": torch.tensor([1]),
        "scores": torch.tensor([0.8]),
        "masks": masks,
    }
    (r,) = to_coco_results(3, out, labels)
    m = decode(r["segmentation"], 8, 6)
    assert m.sum() == 6 and m[1:3, 2:5].all()
    json.dumps(r)
