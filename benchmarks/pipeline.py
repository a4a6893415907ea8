"""8. Pipeline overhead: ``rcnnops run`` (Prefect flow: DVC, MLflow runs,
registration, promotion, push, reports) vs the same stage commands run by
hand, and a no-op rerun.

The bench project was built by running the stage commands by hand
(``rcnnops generate``, ``prepare``, ``proposals``, ``train`` and ``evaluate``
per variant), each timed. Here ``rcnnops run`` does the same work in a fresh
project with the same params, the stage commands run by hand once more after it
(the baseline is the mean of the two), then the run again with nothing changed.
"""

from __future__ import annotations

import shutil

from benchmarks.common import Context, command, new_project, stage_times, timed_run
from benchmarks.paper.overhead import breakdown
from benchmarks.setup import build

TARGET = 0.10  # issue 17: orchestration at most 10 % of the quick project's stage time


def run(ctx: Context) -> dict:
    flow = new_project(ctx.work / "pipeline_flow", {})
    shutil.copy(ctx.project / "params.yaml", flow / "params.yaml")  # the bench project's
    full, lines = timed_run(flow, "run", log=flow / "bench.log")
    _, inside = breakdown(lines, full)  # the stage commands' own time within that run
    stages = stage_times(ctx.project)
    # By hand again, after the run (A/B/A): this VM's speed drifts by 10 % or more
    # within minutes, so one by-hand sum taken before the run is not its baseline.
    after = build(Context(ctx.work / "pipeline_by_hand_after", ctx.quick))
    before_s, after_s = sum(stages.values()), sum(after.values())
    by_hand = (before_s + after_s) / 2
    noop = command(flow, "run")
    overhead = full / by_hand - 1
    rows = [
        {"run": "rcnnops run (fresh project)", "seconds": full},
        {"run": "the stage commands by hand, before the run (sum)", "seconds": before_s},
        {"run": "the stage commands by hand, after the run (sum)", "seconds": after_s},
        {"run": "overhead (Prefect + DVC + MLflow registry + push)", "seconds": full - by_hand},
        {"run": "the stage commands inside that run (their own time)", "seconds": inside},
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
                "target": f"<= {100 * TARGET:.0f} %",
                "holds": overhead <= TARGET,
            },
            {
                "name": "orchestration within the run / its stage commands' time",
                "value": f"{100 * (full - inside) / inside:.1f} %",
                "target": "-",
                "holds": None,
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
            "stage commands by hand, before / after the run: "
            + ", ".join(f"{k} {v:.1f} / {after[k]:.1f} s" for k, v in stages.items()),
            "overhead = the run against the mean of the two by-hand sums",
            "within the run: each stage command's time from DVC's `> rcnnops ...` line to its "
            "`Updating lock file` line (the timestamped log is pipeline_flow/bench.log); the "
            "rest is orchestration, free of the run-to-run spread of the stage commands",
            "the no-op rerun does not start Prefect: `rcnnops run` finds params.yaml, dvc.lock, "
            "`dvc status` and the registry as the last successful run left them",
        ],
    }
