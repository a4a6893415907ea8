"""8. Pipeline overhead: ``rcnnops run`` (Prefect flow: DVC, MLflow runs,
registration, promotion, push, reports) vs the same stage commands run by
hand, and a no-op rerun.

The bench project was built by running the stage commands by hand
(``rcnnops generate``, ``prepare``, ``proposals``, ``train`` and ``evaluate``
per variant), each timed. Here ``rcnnops run`` does the same work in a fresh
project with the same params, then runs again with nothing changed.
"""

from __future__ import annotations

import shutil

from benchmarks.common import Context, command, new_project, stage_times


def run(ctx: Context) -> dict:
    flow = new_project(ctx.work / "pipeline_flow", {})
    shutil.copy(ctx.project / "params.yaml", flow / "params.yaml")  # the bench project's
    full = command(flow, "run")
    stages = stage_times(ctx.project)
    by_hand = sum(stages.values())
    noop = command(flow, "run")
    overhead = full / by_hand - 1
    rows = [
        {"run": "rcnnops run (fresh project)", "seconds": full},
        {"run": "the stage commands by hand (sum, bench project)", "seconds": by_hand},
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
                "quick mode: the bench project's params (160 training images, 2 epochs)"
                if ctx.quick
                else "default params (the same work as `make run`)"
            ),
            "stage commands by hand: " + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items()),
            "the no-op rerun does not start Prefect: `rcnnops run` finds params.yaml, dvc.lock, "
            "`dvc status` and the registry as the last successful run left them",
        ],
    }
