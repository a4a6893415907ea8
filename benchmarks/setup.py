"""The bench project: the default dataset, proposals, the four variants trained
and evaluated by the stage commands (``rcnnops generate``, ``prepare``, ...),
each timed. ``--quick`` shortens the training schedules; the full mode trains
with params.yaml as it is (the same models as ``make run``).

    python -m benchmarks.setup --work benchmarks/.work [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.common import VARIANTS, Context, command, new_project

# Quick mode: half the default training images (the same 80 validation images)
# and two epochs per variant at the full learning rate, so quick AP is well
# below `make run`'s (6 or 9 epochs on 320 images, two learning-rate drops).
QUICK = {
    "generate.num_train": 160,
    "train.*.epochs": 2,
    "train.*.lr_steps": [],
    "train.*.warmup_iters": 20,
}


def build(ctx: Context) -> dict:
    project = new_project(ctx.project, QUICK if ctx.quick else {})
    times: dict[str, float] = {}
    steps = [("generate",), ("prepare",), ("proposals",)]
    steps += [(stage, "--variant", v) for v in VARIANTS for stage in ("train", "evaluate")]
    for args in steps:
        name = args[0] if len(args) == 1 else f"{args[0]}@{args[2]}"
        print(f"setup: {name} ...", flush=True)
        times[name] = round(command(project, *args), 2)
    (project / "stage_times.json").write_text(json.dumps(times, indent=2))
    info = {"quick": ctx.quick, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    (project / "setup.json").write_text(json.dumps(info))
    return times


def ready(ctx: Context) -> bool:
    """A finished bench project made in the same mode."""
    path = ctx.project / "setup.json"
    return path.exists() and json.loads(path.read_text()).get("quick") == ctx.quick


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("benchmarks/.work"))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    times = build(Context(args.work.resolve(), args.quick))
    print(json.dumps(times, indent=2))


if __name__ == "__main__":
    main()
