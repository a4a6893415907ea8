"""Evaluation exactness through our COCO code (pycocotools underneath, or
faster-coco-eval: ``evaluate.backend``)."""

import copy
import json
import math
import typing

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from rcnnops.config import EvaluateParams
from rcnnops.data.masks import decode, encode
from rcnnops.data.prepare import load_split
from rcnnops.evaluate import summarise
from rcnnops.metrics import BACKENDS, coco_evaluate, to_coco_results
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluation_leaves_the_predictions_as_given(tiny_prepared, backend):
    """pycocotools' loadRes adds id, area, iscrowd and a box-shaped polygon to each
    result it is given: predictions.json carried them, and the comparison picture
    drew every box-only variant's boxes as filled masks."""
    coco, _, _ = load_split(tiny_prepared, "val")
    results = _gt_as_results(coco, masks=True)
    given = copy.deepcopy(results)
    coco_evaluate(coco, results, "bbox", backend)
    coco_evaluate(coco, results, "segm", backend)
    assert results == given


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


# --- evaluate.backend: faster-coco-eval against pycocotools ---------------------------

CATEGORIES = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 5, "name": "c"}]
CATEGORIES += [{"id": 7, "name": "no_gt"}]  # only false positives: AP nan


def _generated_gt(seed: int = 0) -> dict:
    """7 images with 1-5 objects each (small, medium and large; diamond polygons or
    ellipse RLE masks, in 3 classes), an image without objects and a crowd region."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(1, 9):
        w, h = (240, 240) if i % 2 else (200, 150)
        images.append({"id": i, "width": w, "height": h, "file_name": f"{i}.png"})
        for _ in range(rng.integers(1, 6) if i < 8 else 0):
            size = rng.choice([rng.uniform(8, 30), rng.uniform(33, 90), rng.uniform(100, 140)])
            bw, bh = (min(size * rng.uniform(0.7, 1.3), d - 4) for d in (w, h))
            x, y = rng.uniform(1, w - bw - 1), rng.uniform(1, h - bh - 1)
            if rng.random() < 0.5:
                seg = [[round(v, 2) for v in (x + bw / 2, y, x + bw, y + bh / 2)]]
                seg[0] += [round(v, 2) for v in (x + bw / 2, y + bh, x, y + bh / 2)]
            else:
                yy, xx = np.mgrid[:h, :w]
                inside = ((xx - x - bw / 2) / (bw / 2)) ** 2 + ((yy - y - bh / 2) / (bh / 2)) ** 2
                seg = encode(inside <= 1)
            anns.append({"image_id": i, "category_id": int(rng.choice([1, 2, 5])), "iscrowd": 0})
            anns[-1]["segmentation"] = seg
    crowd = np.zeros((240, 240), np.uint8)
    crowd[150:230, 10:120] = 1
    flat = crowd.flatten(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()  # uncompressed RLE
    anns.append({"image_id": 1, "category_id": 1, "iscrowd": 1})
    anns[-1]["segmentation"] = {"size": [240, 240], "counts": counts}
    for k, a in enumerate(anns, start=1):
        im = images[a["image_id"] - 1]
        rle = mask_utils.encode(np.asfortranarray(_mask(a, im)))
        a.update(id=k, area=float(mask_utils.area(rle)), bbox=mask_utils.toBbox(rle).tolist())
    return {"images": images, "categories": CATEGORIES, "annotations": anns}


def _mask(ann: dict, image: dict) -> np.ndarray:
    return decode(ann["segmentation"], image["width"], image["height"])


def _gt_predictions(gt: dict) -> list[dict]:
    images = {im["id"]: im for im in gt["images"]}
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "segmentation": encode(_mask(a, images[a["image_id"]])),
            "score": 1.0,
        }
        for a in gt["annotations"]
        if not a["iscrowd"]
    ]


def _noisy_predictions(gt: dict, seed: int = 100) -> list[dict]:
    """Jittered boxes and shifted masks (some objects missed, some found twice),
    false positives everywhere (120 on image 2: past maxDets=100; some of a class
    without ground truth; on the empty image) and one on the crowd region.
    Scores have one decimal: ties, which both backends break by a stable sort."""
    rng = np.random.default_rng(seed)
    images = {im["id"]: im for im in gt["images"]}
    out = []

    def add(image_id, category_id, box, mask):
        score = round(float(rng.random()), 1)
        out.append(
            {
                "image_id": image_id,
                "category_id": category_id,
                "bbox": [round(float(v), 2) for v in box],
                "segmentation": encode(mask),
                "score": score,
            }
        )

    for a in gt["annotations"]:
        mask = _mask(a, images[a["image_id"]])
        for _ in range(rng.choice([0, 1, 1, 1, 2])):
            x, y, w, h = a["bbox"]
            dx, dy = rng.normal(0, 0.12 * w), rng.normal(0, 0.12 * h)
            sw, sh = rng.uniform(0.8, 1.2, 2)
            shifted = np.roll(mask, (round(dy), round(dx)), axis=(0, 1))
            add(a["image_id"], a["category_id"], [x + dx, y + dy, w * sw, h * sh], shifted)
    for image_id, im in images.items():
        w, h = im["width"], im["height"]
        for _ in range(120 if image_id == 2 else rng.integers(2, 6)):
            bw, bh = rng.uniform(6, 80, 2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            box = np.zeros((h, w), np.uint8)
            box[int(y) : int(y + bh), int(x) : int(x + bw)] = 1
            add(image_id, int(rng.choice([1, 2, 5, 7])), [x, y, bw, bh], box)
    on_crowd = np.zeros((240, 240), np.uint8)
    on_crowd[160:220, 20:110] = 1
    add(1, 1, [20, 160, 90, 60], on_crowd)
    return out


def test_backends_are_the_configurable_ones():
    hint = typing.get_type_hints(EvaluateParams)["backend"]
    assert typing.get_args(hint) == BACKENDS
    assert EvaluateParams().backend == "pycocotools"


def test_unknown_backend_names_the_param_and_the_choices():
    gt = _generated_gt()
    with pytest.raises(ValueError, match=r"evaluate\.backend.*pycocotools.*faster_coco_eval.*'x'"):
        coco_evaluate(gt, _gt_predictions(gt), "bbox", "x")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_ground_truth_as_predictions_gives_ap_1_with_both_backends(backend, iou_type):
    gt = _generated_gt()
    before = copy.deepcopy(gt)
    stats, per_class, precision = coco_evaluate(gt, _gt_predictions(gt), iou_type, backend)
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR10", "AR100", "ARs", "ARm"):
        assert stats[f"{iou_type}_{name}"] == 1.0, name
    assert per_class["a"] == per_class["b"] == per_class["c"] == 1.0
    assert math.isnan(per_class["no_gt"])
    assert precision.shape == (10, 101, 4, 4, 3)
    assert gt == before  # COCOeval's scratch keys ("ignore", "rle") stay out of it


# pycocotools' precision is tp / (tp + fp + np.spacing(1)); faster-coco-eval's is
# tp / (tp + fp). They differ only where tp + fp == 1 (the spacing is lost in any
# larger sum): a curve whose best precision comes from its first detection alone,
# a true positive, is 1 / (1 + 2**-52) in pycocotools and 1.0 in faster-coco-eval.
PYCOCOTOOLS_ONE = 1.0 / (1.0 + np.spacing(1.0))


def _as_one(precision: np.ndarray) -> np.ndarray:
    return np.where(precision == PYCOCOTOOLS_ONE, 1.0, precision)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("seed", [0, 1])
def test_faster_coco_eval_gives_pycocotools_numbers(iou_type, seed):
    gt = _generated_gt(seed)
    results = _noisy_predictions(gt, 100 + seed)
    ref = coco_evaluate(gt, copy.deepcopy(results), iou_type, "pycocotools")
    fast = coco_evaluate(gt, copy.deepcopy(results), iou_type, "faster_coco_eval")
    ref_p, fast_p = ref[2], fast[2]
    assert ref_p.shape == fast_p.shape == (10, 101, 4, 4, 3)
    assert (ref_p == PYCOCOTOOLS_ONE).any()  # the one difference occurs here ...
    assert np.array_equal(_as_one(ref_p), _as_one(fast_p))  # ... and is the only one
    # Means over those arrays: equal to the last bits of a double, and to the
    # 6 decimals metrics.json keeps.
    assert list(fast[0]) == list(ref[0])
    for k, v in ref[0].items():
        assert fast[0][k] == pytest.approx(v, rel=0, abs=1e-15), k
        assert round(fast[0][k], 6) == round(v, 6), k
    assert 0.05 < ref[0][f"{iou_type}_AP"] < 0.5  # a real mix of hits and misses
    assert list(fast[1]) == list(ref[1]) == ["a", "b", "c", "no_gt"]
    for k, v in ref[1].items():
        if k == "no_gt":
            assert math.isnan(v) and math.isnan(fast[1][k])
        else:
            assert fast[1][k] == pytest.approx(v, rel=0, abs=1e-15), k


def test_both_backends_leave_results_alike():
    """loadRes adds id/area/iscrowd/segmentation to box results in place (evaluate
    writes them to predictions.json afterwards): the same with both backends."""
    gt = _generated_gt()
    ref = [{k: v for k, v in r.items() if k != "segmentation"} for r in _noisy_predictions(gt)]
    fast = copy.deepcopy(ref)
    coco_evaluate(gt, ref, "bbox", "pycocotools")
    coco_evaluate(gt, fast, "bbox", "faster_coco_eval")
    assert ref == fast
    json.dumps(fast)
