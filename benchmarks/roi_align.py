"""5. RoIAlign vs RoIPool in Mask R-CNN's mask head: mask AP on the default data.

The bench project's Mask R-CNN (RoIAlign, 14x14, bilinear) against the same
model, schedule and seed with the mask head's RoIAlign swapped for quantised
RoIPool (``train.mask_rcnn.model.mask_roi_op: pool``), trained and evaluated
by the stage commands in a copy of the project.
"""

from __future__ import annotations

import shutil

from benchmarks.common import Context, command, metrics, stage_times


def run(ctx: Context) -> dict:
    from rcnnops.params_edit import set_params

    copy = ctx.work / "roi_pool"
    if copy.exists():
        shutil.rmtree(copy)
    copy.mkdir(parents=True)
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ctx.project / name, copy / name)
    for name in ("src", "data"):
        shutil.copytree(ctx.project / name, copy / name)
    set_params(copy / "params.yaml", {"train.mask_rcnn.model.mask_roi_op": "pool"})
    train_s = command(copy, "train", "--variant", "mask_rcnn")
    command(copy, "evaluate", "--variant", "mask_rcnn")
    rows = []
    for name, project, seconds in (
        ("RoIAlign (bilinear)", ctx.project, stage_times(ctx.project).get("train@mask_rcnn")),
        ("RoIPool (quantised)", copy, train_s),
    ):
        m = metrics(project, "mask_rcnn")
        rows.append(
            {
                "mask head RoI op": name,
                "segm AP": m["segm_AP"],
                "segm AP50": m["segm_AP50"],
                "segm AP75": m["segm_AP75"],
                "bbox AP": m["bbox_AP"],
                "train stage s": seconds,
            }
        )
    gain = rows[0]["segm AP"] - rows[1]["segm AP"]
    return {
        "title": "5. RoIAlign vs RoIPool (Mask R-CNN mask head)",
        "paper": "ResNet-50-C4 on COCO: RoIAlign +3.4 mask AP (+4.6 AP75) over RoIPool",
        "columns": list(rows[0]),
        "rows": rows,
        "targets": [
            {
                "name": "segm AP gain of RoIAlign (points)",
                "value": 100 * gain,
                "unit": "AP points",
                "target": "+3.4 (paper)",
                "holds": gain > 0,
            }
        ],
        "notes": [
            "one training run each (seed 0); the box head uses RoIAlign in both",
        ],
    }
