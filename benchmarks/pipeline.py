"""8. Pipeline overhead: ``rcnnops run`` (Prefect flow: DVC, MLflow runs,
registration, promotion, push, reports) vs the same stage commands run by
hand, and a no-op rerun.

Two fresh projects with the same params: one runs ``rcnnops run``, the other
``rcnnops generate``, ``prepare``, ``proposals``, ``train`` and ``evaluate``
per variant, each command timed. Then ``rcnnops run`` again on the first,
with nothing changed. ``--quick`` uses a small dataset and one epoch per
variant, so fixed costs weigh more than on the default schedule.
"""

from __future__ import annotations

from benchmarks.common import VARIANTS, Context, command, new_project

SMALL = {
    "generate.num_train": 48,
    "generate.num_val": 12,
    "train.*.epochs": 1,
    "train.*.lr_steps": [],
    "train.*.warmup_iters": 10,
}


def run(ctx: Context) -> dict:
    changes = ctx.pick(SMALL, {})
    flow = new_project(ctx.work / "pipeline_flow", changes)
    hand = new_project(ctx.work / "pipeline_hand", changes)
    full = command(flow, "run")
    stages: dict[str, float] = {}
    for args in [("generate",), ("prepare",), ("proposals",)] + [
        (stage, "--variant", v) for v in VARIANTS for stage in ("train", "evaluate")
    ]:
        stages[" ".join(args)] = command(hand, *args)
    by_hand = sum(stages.values())
    noop = command(flow, "run")
    overhead = full / by_hand - 1
    rows = [
        {"run": "rcnnops run (fresh project)", "seconds": full},
        {"run": "stage commands by hand (sum)", "seconds": by_hand},
        {"run": "overhead (Prefect + DVC + MLflow registry + push)", "seconds": full - by_hand},
        {"run": "rcnnops run again, nothing changed", "seconds": noop},
    ]
    return {
        "title": "8. Pipeline overhead and no-op rerun",
        "paper": "-",
        "columns": list(rows[0]),
        "rows": rows,
        "targets": [
            {
                "name": "orchestration overhead",
                "value": f"{100 * overhead:.1f} %",
                "target": "<= 5 %",
                "holds": overhead <= 0.05,
            },
            {
                "name": "no-op rerun",
                "value": f"{noop:.1f} s",
                "target": "<= 10 s",
                "holds": noop <= 10.0,
            },
        ],
        "notes": [
            (
                "quick mode: 48 + 12 images, one epoch per variant"
                if ctx.quick
                else "default params (the same work as `make run`)"
            ),
            "stage times by hand: " + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items()),
        ],
    }
