"""4. Mask R-CNN vs Faster R-CNN at inference: what the mask branch costs.

Same backbone settings and images, interleaved; the network alone (the
detector's forward, pasting masks at full resolution included) and with the
results encoded for COCO (RLE for masks).
"""

from __future__ import annotations

import torch

from benchmarks.common import Context, ab, load_trained, median_ms, val_dataset


def run(ctx: Context) -> dict:
    from rcnnops.metrics import to_coco_results

    dataset, _, labels = val_dataset(ctx.project)
    models = {v: load_trained(ctx.project, v)[0] for v in ("faster_rcnn", "mask_rcnn")}
    samples = [dataset[i] for i in range(min(len(dataset), ctx.pick(24, 80)))]

    def forward(m, encode: bool):
        def f(sample):
            image, target = sample
            with torch.no_grad():
                out = m([image])
            if encode:
                to_coco_results(int(target["image_id"]), out[0], labels)

        return f

    cases = {}
    for v, m in models.items():
        cases[v] = forward(m, False)
        cases[f"{v} + COCO encoding"] = forward(m, True)
    times = ab(cases, samples)
    ms = {k: median_ms(t) for k, t in times.items()}
    rows = [
        {
            "model": v,
            "network ms/img": ms[v],
            "network + encoding ms/img": ms[f"{v} + COCO encoding"],
        }
        for v in models
    ]
    net = ms["mask_rcnn"] / ms["faster_rcnn"] - 1
    full = ms["mask_rcnn + COCO encoding"] / ms["faster_rcnn + COCO encoding"] - 1
    return {
        "title": "4. Mask R-CNN vs Faster R-CNN inference overhead",
        "paper": "ResNet-101-FPN: 195 ms vs ~160 ms per image on a GPU, masks add about 20 %",
        "columns": list(rows[0]),
        "rows": rows,
        "targets": [
            {
                "name": "mask overhead, network",
                "value": 100 * net,
                "unit": "%",
                "target": "about +20 % (paper)",
                "holds": None,
            },
            {
                "name": "mask overhead, with RLE encoding",
                "value": 100 * full,
                "unit": "%",
                "target": "-",
                "holds": None,
            },
        ],
        "notes": [f"{len(samples) - 1} timed images (one warm-up), trained models, CPU"],
    }
