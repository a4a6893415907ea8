"""6. COCO evaluation: pycocotools vs faster-coco-eval on the same detections.

Both backends evaluate the bench project's Faster R-CNN boxes and Mask R-CNN
boxes and masks (its ``reports/<variant>/predictions.json``), interleaved;
their 12 numbers, per-class AP and precision arrays must be identical.
"""

from __future__ import annotations

import json

import numpy as np

from benchmarks.common import Context, ab, median_ms, val_dataset

BACKENDS = ("pycocotools", "faster_coco_eval")


def run(ctx: Context) -> dict:
    from rcnnops.metrics import coco_evaluate

    _, gt, _ = val_dataset(ctx.project)
    jobs = []
    for variant, iou_type in (
        ("faster_rcnn", "bbox"),
        ("mask_rcnn", "bbox"),
        ("mask_rcnn", "segm"),
    ):
        path = ctx.project / "reports" / variant / "predictions.json"
        jobs.append((f"{variant} {iou_type}", iou_type, json.loads(path.read_text())))
    rows, identical, worst = [], True, 0.0
    for name, iou_type, results in jobs:
        outs: dict[str, tuple] = {}

        def case(backend, iou_type=iou_type, results=results, outs=outs):
            return lambda _: outs.__setitem__(
                backend, coco_evaluate(gt, results, iou_type, backend=backend)
            )

        times = ab({b: case(b) for b in BACKENDS}, range(ctx.pick(4, 8)))
        (sa, ca, pa), (sb, cb, pb) = outs["pycocotools"], outs["faster_coco_eval"]
        stat_diff = max(abs(sa[k] - sb[k]) for k in sa)
        class_diff = max((abs(ca[k] - cb[k]) for k in ca if ca[k] == ca[k]), default=0.0)
        prec_diff = float(np.abs(pa - pb).max()) if pa.shape == pb.shape else float("inf")
        rounded = {k: round(v, 6) for k, v in sa.items()} == {k: round(v, 6) for k, v in sb.items()}
        same = rounded and max(stat_diff, class_diff, prec_diff) < 1e-12
        identical &= same
        worst = max(worst, stat_diff, class_diff, prec_diff)
        a, b = median_ms(times["pycocotools"]), median_ms(times["faster_coco_eval"])
        rows.append(
            {
                "detections": name,
                "count": len(results),
                "AP": sa[f"{iou_type}_AP"],
                "pycocotools ms": a,
                "faster-coco-eval ms": b,
                "speedup": a / b,
                "max abs diff": f"{max(stat_diff, class_diff, prec_diff):.1e}",
                "same to 6 decimals": "yes" if rounded else "NO",
            }
        )
    return {
        "title": "6. COCO evaluation backends",
        "paper": "faster-coco-eval claims 3-4x over pycocotools with identical results",
        "columns": list(rows[0]),
        "rows": rows,
        "targets": [
            {
                "name": "same 12 numbers, per-class AP and precision (max abs difference)",
                "value": worst,
                "unit": "",
                "target": "identical (within 1e-12)",
                "holds": identical,
            },
        ],
        "notes": [
            "selectable with `evaluate.backend` in params.yaml (default pycocotools)",
            "pycocotools divides by tp + fp + np.spacing(1), faster-coco-eval by tp + fp: "
            "precision cells where tp + fp = 1 differ by 2.2e-16; metrics.json (6 decimals) "
            "is the same",
        ],
    }
