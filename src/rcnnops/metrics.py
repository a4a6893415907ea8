"""COCO metrics and prediction: pure code shared by training (validation) and evaluate.

Boxes leave the models as xyxy pixels and are converted to COCO's xywh here,
at the boundary, when results are written.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from rcnnops.config import STAT_NAMES
from rcnnops.data.labels import LabelMap

# ``evaluate.backend``: pycocotools, the reference, or faster-coco-eval (C++
# evaluate/accumulate). Same matching and curves; pycocotools alone adds 2**-52 to
# precision's denominator, so numbers agree to ~1e-16 (tests/code/test_evaluate.py).
BACKENDS = ("pycocotools", "faster_coco_eval")


def _coco_api(backend: str = "pycocotools") -> tuple[type, Callable[..., Any]]:
    """The ``COCO`` class and a quiet ``COCOeval`` constructor of ``backend``."""
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster

        # Its messages go to print_function (default: logging.info), not stdout.
        return COCO, partial(COCOeval_faster, print_function=lambda *a, **k: None)
    raise ValueError(f"evaluate.backend: expected one of {BACKENDS}, got {backend!r}")


def _quiet_coco(coco_cls: type, dataset: dict) -> Any:
    coco = coco_cls()
    # Annotations copied: COCOeval writes into them ("ignore"; faster-coco-eval "rle").
    coco.dataset = dataset | {"annotations": [dict(a) for a in dataset["annotations"]]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _results_coco(gt: Any, results: list[dict]) -> Any:
    """``gt.loadRes(results)`` for a possibly empty result list."""
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return gt.loadRes(results)
    empty = {
        "images": gt.dataset["images"],
        "categories": gt.dataset["categories"],
        "annotations": [],
    }
    return _quiet_coco(type(gt), empty)


def coco_evaluate(
    gt: dict, results: list[dict], iou_type: str = "bbox", backend: str = "pycocotools"
) -> tuple[dict[str, float], dict[str, float], np.ndarray]:
    """COCOeval of ``results`` (COCO results format) against ground truth ``gt``.

    Returns ``({"bbox_AP": ..., 12 numbers; -1 where undefined, as COCOeval},
    {category name: AP}, precision)``
    where ``precision`` is COCOeval's ``[T, R, K, A, M]`` array. Classes with
    no ground truth get AP ``nan`` (COCOeval's -1), excluded from the mean.
    ``backend`` (``evaluate.backend``) is one of :data:`BACKENDS`.
    """
    coco_cls, coco_eval = _coco_api(backend)
    if iou_type == "segm":
        if results and "segmentation" not in results[0]:
            raise ValueError("segm evaluation needs results with 'segmentation' (RLE masks)")
        # Without 'bbox', loadRes takes each result's area and box from its mask
        # (as Detectron2 does), so area ranges (APs/APm/APl) follow the mask.
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    else:  # loadRes adds id, area, iscrowd and a box-shaped polygon to each result
        results = [dict(r) for r in results]  # the caller's (predictions.json) stay as given
    coco_gt = _quiet_coco(coco_cls, gt)
    coco_dt = _results_coco(coco_gt, results)
    ev = coco_eval(coco_gt, coco_dt, iou_type)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {f"{iou_type}_{n}": float(v) for n, v in zip(STAT_NAMES, ev.stats, strict=True)}
    precision = ev.eval["precision"]  # [T, R, K, A(all, s, m, l), M(1, 10, 100)]
    per_class = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        name = coco_gt.cats[cat_id]["name"]
        per_class[name] = float(p[p > -1].mean()) if (p > -1).any() else math.nan
    return stats, per_class, precision


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    labels: LabelMap,
    device: torch.device,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[list[dict], float]:
    """Run ``model`` over ``dataset``; COCO results (xywh, category ids) and ms/image."""
    model.eval()
    results: list[dict] = []
    elapsed, n = 0.0, 0
    indices = list(range(len(dataset)))
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    for batch in tqdm(batches, desc="predict", unit="batch", disable=not progress, leave=False):
        samples = [dataset[i] for i in batch]
        images = [s[0].to(device) for s in samples]
        proposals = (
            [s[1]["proposals"].to(device) for s in samples]
            if ("proposals" in samples[0][1])
            else None
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        outputs = model(images, proposals=proposals) if proposals is not None else model(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - t0
        n += len(images)
        for (_, target), out in zip(samples, outputs, strict=True):
            results.extend(to_coco_results(int(target["image_id"]), out, labels))
    return results, 1000.0 * elapsed / max(n, 1)


def to_coco_results(image_id: int, output: dict, labels: LabelMap) -> list[dict]:
    """One image's detections (xyxy) -> COCO result records (xywh, category id;
    ``segmentation`` as compressed RLE when the output has ``masks`` ``[N, 1, H, W]``,
    binarised by :func:`~rcnnops.data.masks.binarize`)."""
    boxes = output["boxes"].detach().float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    records = [
        {
            "image_id": image_id,
            "category_id": labels.category_id(int(lab)),
            "bbox": [round(v, 2) for v in box],
            "score": round(float(s), 5),
        }
        for box, lab, s in zip(
            xywh, output["labels"].tolist(), output["scores"].tolist(), strict=True
        )
    ]
    if "masks" in output:
        from rcnnops.data.masks import binarize, encode

        binary = binarize(output["masks"][:, 0])
        for rec, mask in zip(records, binary, strict=True):
            rec["segmentation"] = encode(mask)
    return records
