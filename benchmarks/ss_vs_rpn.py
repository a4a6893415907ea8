"""3. Selective search + Fast R-CNN vs Faster R-CNN, end to end per image.

From the image file to detections: load, propose (selective search on the
image, or the RPN inside Faster R-CNN), detect. Same images, interleaved,
the bench project's trained models.
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import Context, Split, ab, load_params, load_trained, median_ms, val_dataset


def run(ctx: Context) -> dict:
    from rcnnops.data.io import load_image, load_image_array
    from rcnnops.proposals.selective_search import selective_search

    p = load_params(ctx.project).proposals
    dataset, _, _ = val_dataset(ctx.project)
    fast, _ = load_trained(ctx.project, "fast_rcnn")
    faster, _ = load_trained(ctx.project, "faster_rcnn")
    split = Split()
    split.wrap(faster.rpn, "forward", "rpn")
    search_s: list[float] = []
    rpn_s: list[float] = []

    def ss_fast(i: int) -> None:
        path = dataset.image_path(i)
        image = load_image(path)
        t0 = time.perf_counter()
        array = load_image_array(path)
        boxes, _ = selective_search(array, p.mode, p.max_boxes, p.min_size, p.dedup_iou)
        search_s.append(time.perf_counter() - t0)
        with torch.no_grad():
            fast([image], proposals=[torch.as_tensor(boxes, dtype=torch.float32)])

    def rpn_faster(i: int) -> None:
        image = load_image(dataset.image_path(i))
        with torch.no_grad():
            faster([image])
        rpn_s.append(split.take().get("rpn", 0.0))

    n = min(len(dataset), ctx.pick(16, 80))
    times = ab({"ss + fast_rcnn": ss_fast, "faster_rcnn": rpn_faster}, range(n))
    ss_ms, rpn_ms = median_ms(search_s[1:]), median_ms(rpn_s[1:])
    a, b = median_ms(times["ss + fast_rcnn"]), median_ms(times["faster_rcnn"])
    rows = [
        {"system": "selective search + fast_rcnn", "proposals ms": ss_ms, "end to end ms/img": a},
        {"system": "faster_rcnn (RPN)", "proposals ms": rpn_ms, "end to end ms/img": b},
    ]
    return {
        "title": "3. Selective search + Fast R-CNN vs Faster R-CNN, end to end",
        "paper": "VGG16 on a K40: proposals 1.5 s -> 10 ms; whole system 1830 -> 198 ms (9.2x)",
        "columns": list(rows[0]),
        "rows": rows,
        "targets": [
            {
                "name": "end-to-end speedup",
                "value": a / b,
                "unit": "x",
                "target": "9.2x (paper)",
                "holds": None,
            },
            {
                "name": "proposal speedup",
                "value": ss_ms / rpn_ms,
                "unit": "x",
                "target": "150x (paper)",
                "holds": None,
            },
        ],
        "notes": [
            f"{n - 1} timed images (one warm-up), selective search mode '{p.mode}' "
            "(single process; the pipeline precomputes it in parallel once per dataset)"
        ],
    }
