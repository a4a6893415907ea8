"""Evaluation exactness through our COCO code (pycocotools underneath)."""

import json

import pytest
import torch

from rcnnops.data.prepare import load_split
from rcnnops.evaluate import plot_pr, summarise
from rcnnops.metrics import coco_evaluate, to_coco_results


def _gt_as_results(coco):
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 1.0,
        }
        for a in coco["annotations"]
        if not a.get("iscrowd", 0)
    ]


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
    stats, per_class, precision = coco_evaluate(coco, _gt_as_results(coco))
    metrics = summarise(stats, per_class, 12.5)
    plot_pr(precision, labels.names, tmp_path / "pr.png", "test")
    assert (tmp_path / "pr.png").stat().st_size > 1000
    assert json.loads(json.dumps(metrics))["infer_ms_per_image"] == 12.5
    assert set(metrics["per_class_AP"]) == set(labels.names)
