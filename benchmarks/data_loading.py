"""10. Data loading: images/s of the training data path alone (decode, masks,
flip, collate through a DataLoader) vs images/s of the training step.

If loading is several times faster than training, it is not the bottleneck
(``train.workers`` adds DataLoader processes; pinned memory is used on CUDA).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from benchmarks.common import Context, load_params, now, val_dataset


def run(ctx: Context) -> dict:
    from rcnnops.data.dataset import collate
    from rcnnops.data.transforms import RandomHorizontalFlip
    from rcnnops.models import build_model

    params = load_params(ctx.project)
    rows = []
    for variant in ("faster_rcnn", "mask_rcnn"):
        vp = params.variant(variant)
        dataset, _, labels = val_dataset(ctx.project, train=True)
        dataset.transform = RandomHorizontalFlip(vp.hflip)
        dataset.masks = variant == "mask_rcnn"
        n = min(len(dataset), ctx.pick(160, 320))
        subset = torch.utils.data.Subset(dataset, range(n))
        rates = {}
        for workers in (0, 2):
            loader = DataLoader(
                subset,
                vp.batch_size,
                shuffle=True,
                num_workers=workers,
                collate_fn=collate,
                pin_memory=torch.cuda.is_available(),
            )
            t0 = now()
            for _ in loader:
                pass
            rates[workers] = n / (now() - t0)
        torch.manual_seed(0)
        model = build_model(variant, labels.num_classes + 1, vp.model).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        batches = list(DataLoader(subset, vp.batch_size, collate_fn=collate))[: ctx.pick(8, 20)]
        times = []
        for images, targets in batches:
            t0 = now()
            loss = sum(model(images, targets).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(now() - t0)
        times = sorted(times[1:])
        step_rate = vp.batch_size / times[len(times) // 2]
        rows.append(
            {
                "variant": variant,
                "loader img/s (0 workers)": rates[0],
                "loader img/s (2 workers)": rates[2],
                "training step img/s": step_rate,
                "loading / training": rates[0] / step_rate,
            }
        )
    worst = min(r["loading / training"] for r in rows)
    return {
        "title": "10. Data loading vs training step",
        "paper": "-",
        "columns": list(rows[0]),
        "rows": rows,
        "targets": [
            {
                "name": "loading faster than training (in-process loader)",
                "value": worst,
                "unit": "x",
                "target": "> 1x (not the bottleneck)",
                "holds": worst > 1.0,
            },
        ],
        "notes": ["CPU: the step competes with loader workers for the same cores"],
    }
