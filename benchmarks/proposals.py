"""7. Selective search with 1 vs N worker processes; cached proposals vs
recomputing them.

Throughput on the bench project's validation images, 1 and N processes
interleaved A/B/A/B (pools started and warmed up first); then reading one
image's boxes from the cache (``data/proposals``) against searching again.
"""

from __future__ import annotations

import os
import statistics
import time

from benchmarks.common import Context, ab, load_params, median_ms, val_dataset


def run(ctx: Context) -> dict:
    from rcnnops.proposals.precompute import (
        ProposalStore,
        compute_split,
        search_pool,
        settings_from,
    )

    params = load_params(ctx.project)
    settings = settings_from(params)
    workers = max(2, params.proposals.workers, min(os.cpu_count() or 1, 8))
    dataset, coco, _ = val_dataset(ctx.project)
    coco = dict(coco, images=coco["images"][: ctx.pick(40, 80)])
    root = dataset.image_root
    n = len(coco["images"])
    with search_pool(workers) as pool:
        list(pool.map(time.sleep, [1.0] * workers))  # start every worker
        compute_split(coco, root, settings, workers, pool=pool)  # warm-up
        times = ab(
            {
                "1 worker": lambda _: compute_split(coco, root, settings, 1),
                f"{workers} workers": lambda _: compute_split(
                    coco, root, settings, workers, pool=pool
                ),
            },
            range(ctx.pick(2, 3)),
            warmup=0,
        )
    one = statistics.median(times["1 worker"])
    many = statistics.median(times[f"{workers} workers"])

    store_dir = ctx.project / params.proposals.out / "val"
    ids = sorted(im["id"] for im in coco["images"])

    def cached(_):
        store = ProposalStore(store_dir)  # opening checks the checksums too
        for i in ids:
            store.boxes_for(i)

    load = ab({"cached": cached}, range(4))["cached"]
    load_ms = median_ms(load) / n
    rows = [
        {"case": "selective search, 1 worker", "ms/img": 1000 * one / n, "img/s": n / one},
        {
            "case": f"selective search, {workers} workers",
            "ms/img": 1000 * many / n,
            "img/s": n / many,
        },
        {
            "case": "cached proposals (open with checksums + read)",
            "ms/img": load_ms,
            "img/s": 1000 / load_ms,
        },
    ]
    return {
        "title": "7. Selective search workers; cached vs recomputed proposals",
        "paper": "R-CNN / Fast R-CNN precompute selective search once (about 2 s/img on a CPU)",
        "columns": list(rows[0]),
        "rows": rows,
        "targets": [
            {
                "name": f"{workers} workers vs 1",
                "value": one / many,
                "unit": "x",
                "target": f"close to {min(workers, os.cpu_count() or 1)}x on idle cores",
                "holds": None,
            },
            {
                "name": "cache vs recompute",
                "value": (1000 * one / n) / load_ms,
                "unit": "x",
                "target": ">> 1",
                "holds": (1000 * one / n) > load_ms,
            },
        ],
        "notes": [
            f"{n} images, mode '{settings.mode}', {os.cpu_count()} CPU cores; "
            "`proposals.workers` in params.yaml sets the pipeline's"
        ],
    }
