"""Real COCO 2017 data (../shared/data/coco-mini): prepare, short training, evaluation.

Opt-in: ``make test-data`` (``pytest -m data``); skipped when the folder is absent.
"""

import json

import pytest

from rcnnops import evaluate, train
from rcnnops.config import parse_params
from rcnnops.data import prepare
from rcnnops.data.prepare import load_split
from rcnnops.metrics import coco_evaluate
from tests.conftest import COCO_MINI

pytestmark = [
    pytest.mark.data,
    pytest.mark.skipif(not COCO_MINI.is_dir(), reason=f"{COCO_MINI} not present"),
]


def _params(tmp_path, monkeypatch):
    """coco-mini's params, in a project at ``tmp_path`` (outputs are project folders)."""
    monkeypatch.chdir(tmp_path)
    return parse_params(
        {
            "variants": ["faster_rcnn"],
            "data": {
                "root": str(COCO_MINI),
                "train": {
                    "annotations": "annotations/instances_train2017.json",
                    "images": "train2017",
                },
                "val": {"annotations": "annotations/instances_val2017.json", "images": "val2017"},
            },
            "prepare": {"out": "prepared"},
            "train": {
                "out": "models",
                "device": "cpu",
                "faster_rcnn": {
                    "epochs": 1,
                    "batch_size": 4,
                    "lr": 0.01,
                    "warmup_iters": 5,
                    "lr_steps": [],
                    "model": {
                        "backbone": "small",
                        "min_size": 256,
                        "max_size": 384,
                        "anchor_sizes": [16, 32, 64, 128],
                        "box_head": "mlp_bn",
                        "roi_op": "pool",
                    },
                },
            },
            "evaluate": {"out": "reports"},
            "register": {"experiment": "coco-mini-test"},
        }
    )


def test_prepare_train_evaluate_on_coco_mini(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    p = _params(tmp_path, monkeypatch)
    manifest = prepare.run(p)
    assert manifest["num_classes"] == 80
    assert manifest["splits"]["train"] == {
        **manifest["splits"]["train"],
        "images": 80,
        "annotations": 739,
    }
    assert manifest["validation"]["train"]["crowd"] == 8
    meta = train.run(p, "faster_rcnn", progress=False)
    assert meta["num_classes"] == 81 and meta["steps"] == 20
    m = evaluate.run(p, "faster_rcnn", progress=False)
    assert 0.0 <= m["bbox_AP"] <= 1.0
    saved = json.loads((tmp_path / "reports/faster_rcnn/metrics.json").read_text())
    assert set(saved["per_class_AP"]) >= {"person", "dog"}
    assert saved["per_class_AP"]["hot dog"] is None  # not in val: undefined, not 0


def test_ground_truth_of_coco_mini_val_gives_ap_1(tmp_path, monkeypatch):
    p = _params(tmp_path, monkeypatch)
    prepare.prepare(p.data, p.prepare)
    coco, _, _ = load_split(tmp_path / "prepared", "val")
    results = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 1.0,
        }
        for a in coco["annotations"]
        if not a["iscrowd"]
    ]
    stats, _, _ = coco_evaluate(coco, results)
    assert stats["bbox_AP"] == pytest.approx(1.0)


def test_ground_truth_masks_of_coco_mini_val_give_segm_ap_1(tmp_path, monkeypatch):
    """Polygons and RLE of real COCO, encoded as our results RLE, score exactly 1.0."""
    from rcnnops.data.masks import decode, encode

    p = _params(tmp_path, monkeypatch)
    prepare.prepare(p.data, p.prepare)
    coco, _, _ = load_split(tmp_path / "prepared", "val")
    sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    results = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "segmentation": encode(decode(a["segmentation"], *sizes[a["image_id"]])),
            "score": 1.0,
        }
        for a in coco["annotations"]
        if not a["iscrowd"]
    ]
    stats, _, _ = coco_evaluate(coco, results, "segm")
    assert stats["segm_AP"] == pytest.approx(1.0)
    assert coco_evaluate(coco, results)[0]["bbox_AP"] == pytest.approx(1.0)
