"""7. Where ``rcnnops run``'s orchestration time goes.

``rcnnops run`` on a small default-data project (the bench-quick params, fewer
images), its output timestamped line by line; each stretch of wall time between
two finished Prefect tasks is charged to the task that finished, and inside the
stage tasks the stage commands' own time (from DVC's ``> rcnnops ...`` line to
its ``Updating lock file``) is split off. Tasks that run beside others (the
tracking store and the warm-up beside the data stages, ``dvc push`` and the
comparison's picture beside registration) are charged nothing: what the run
waits for them shows in the task that waited. What is left is the orchestration:
Python and Prefect start, DVC's work around each stage, the MLflow tracking
store, registration and promotion, the comparison, ``dvc push``, shutdown.
The share against bench-quick's stage time is read from benchmarks/results.json
(``make bench-quick``'s pipeline row), not measured here.
"""

from __future__ import annotations

import json
import os
import re

from benchmarks.common import REPO, new_project, timed_run
from benchmarks.paper.common import Ctx

SMALL = {  # bench-quick's settings (benchmarks.setup.QUICK) on fewer images
    "generate.num_train": 48,
    "generate.num_val": 16,
    "train.*.epochs": 1,
    "train.*.lr_steps": [],
    "train.*.warmup_iters": 10,
}
_TASK_END = re.compile(r"Task run '([a-z-]+)-[0-9a-f]+' - Finished in state")
BESIDE = frozenset({"tracking-store", "warm-up", "dvc-push", "compare-picture"})  # (off the path)
_FLOW_START = re.compile(r"Beginning flow run")


def breakdown(lines: list[tuple[float, str]], total: float) -> tuple[dict, float]:
    """(seconds by part, the stage commands' own seconds) from a timestamped log."""
    parts: dict[str, float] = {}
    commands, last, cmd_start = 0.0, 0.0, None
    task_commands = 0.0
    flow_started = False
    for t, line in lines:
        if not flow_started and _FLOW_START.search(line):
            parts["start: Python, Prefect's API, the flow run"] = t
            last, flow_started = t, True
        elif line.startswith("> rcnnops "):
            cmd_start = t
        elif line.startswith("Updating lock file") and cmd_start is not None:
            task_commands += t - cmd_start
            cmd_start = None
        elif (m := _TASK_END.search(line)) and m.group(1) not in BESIDE:
            name = m.group(1)
            key = {
                "dvc-repro": "DVC around stages",
                "version-data": "DVC around stages",
                "train-evaluate": "DVC around stages",
                "dvc-status": "dvc status",
                "ensure-dvc": "DVC repo / remote check",
                "register": "MLflow: log model + register (per variant)",
                "promote": "MLflow: promotion gate (per variant)",
                "compare": "comparison table + side-by-side plot",
            }.get(name, name)
            parts[key] = parts.get(key, 0.0) + (t - last) - task_commands
            commands += task_commands
            task_commands, last = 0.0, t
    parts["end: artifacts, run state, Prefect shutdown"] = total - last
    return parts, commands


def _shown(path) -> str:
    """``path`` relative to the repository when it is inside it."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def run(ctx: Ctx) -> dict:
    project = new_project(ctx.work / "overhead", SMALL)
    total, lines = timed_run(project, "run", log=ctx.work / "overhead.log")
    parts, commands = breakdown(lines, total)
    overhead = total - commands
    rows = [{"part": k, "seconds": v, "share of overhead": v / overhead} for k, v in parts.items()]
    rows.append({"part": "orchestration, all", "seconds": overhead, "share of overhead": 1.0})
    rows.append(
        {"part": "stage commands (their own time)", "seconds": commands, "share of overhead": None}
    )
    targets = []
    try:  # make bench-quick's measurement of the same overhead against its stage time
        doc = json.loads((REPO / "benchmarks" / "results.json").read_text())
        pipeline = next(s for s in doc["sections"] if s.get("name") == "pipeline")
        t = next(t for t in pipeline["targets"] if t.get("key") == "overhead")
        share = float(t["value"]) / 100
        targets.append(
            {
                "name": "orchestration overhead / stage time, make bench-quick, median of its "
                f"runs (results.json, {doc['finished']})",
                "value": share,
                "unit": "",
                "target": "<= 0.10",
                "holds": share <= 0.10,
            }
        )
    except (OSError, ValueError, KeyError, StopIteration):
        pass
    targets.append(
        {
            "name": "orchestration seconds of one rcnnops run (small project, 4 variants)",
            "value": overhead,
            "unit": "s",
            "target": "-",
            "holds": None,
        }
    )
    return {
        "title": "7. Orchestration overhead of rcnnops run, explained",
        "paper": "-",
        "columns": list(rows[0]),
        "rows": rows,
        "targets": targets,
        "notes": [
            f"one `rcnnops run` of a fresh project ({SMALL['generate.num_train']} training "
            f"images, 1 epoch per variant), {total:.0f} s in all, on {os.cpu_count()} cores; "
            f"the timestamped log is {_shown(ctx.work / 'overhead.log')}",
            "DVC around stages: `dvc repro` starting (one for generate + prepare, one for "
            "proposals, one per variant for train + evaluate), hashing dependencies and "
            "outputs, writing dvc.lock and the cache for each of the 11 stages, and the wait "
            "for each variant's stage slot",
        ],
    }
