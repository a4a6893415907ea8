"""rcnnops benchmarks: the R-CNN papers' speed/accuracy comparisons on this
machine and the default data, and where the pipeline's time goes.

    python -m benchmarks [--quick] [--only variants,coco_eval] [--reuse] [--pipeline-runs N]

First the bench project is built (``benchmarks.setup``: data, proposals, the
four variants trained and evaluated by the stage commands), then each
comparison runs in a process of its own, timing its cases interleaved
(A/B/A/B) on the same inputs and reporting medians and ratios. Writes
``benchmarks/results.md`` (tables) and ``benchmarks/results.json`` (the same
with the machine and package versions). ``--quick`` (CPU, about 22 minutes on
2 cores, 16 of them the pipeline row's three runs) trains short schedules and
times fewer images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from benchmarks.common import REPO, Context, fmt, shown, write_section

COMPARISONS = (
    "variants",
    "rcnn_vs_fast",
    "ss_vs_rpn",
    "mask_overhead",
    "roi_align",
    "coco_eval",
    "proposals",
    "pipeline",
    "tracking",
    "data_loading",
    "hardware",
)
PACKAGES = (
    "torch",
    "torchvision",
    "numpy",
    "opencv-contrib-python-headless",
    "pycocotools",
    "faster-coco-eval",
    "mlflow",
    "prefect",
    "dvc",
)


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        ram = f"{kb / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        ram = "?"
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram": ram,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git": commit,
        "packages": versions,
    }


def _table(section: dict) -> list[str]:
    cols = section["columns"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in section["rows"]:
        cells = []
        for c in cols:
            v = row.get(c)
            digits = 3 if isinstance(v, float) and ("AP" in c or abs(v) < 1) else 1
            if isinstance(v, float) and ("speedup" in c or c.startswith("vs ") or "/" in c):
                cells.append(f"{v:.2f}" + ("x" if "speedup" in c or c.startswith("vs ") else ""))
            else:
                cells.append(fmt(v, digits))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _holds(h) -> str:
    return {True: "holds", False: "**does not hold**", None: "reported"}[h]


def markdown(doc: dict) -> str:
    m = doc["machine"]
    out = [
        "# rcnnops benchmarks",
        "",
        f"`{doc['command']}`, {doc['finished']}, {doc['minutes']:.1f} min "
        f"({'quick' if doc['quick'] else 'full'} mode).",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM, "
        f"{m['cuda'] or 'no GPU (CPU)'}; {m['platform']}, Python {m['python']}, "
        f"torch threads {m['torch_threads']}; rcnnops {m['git']}.",
        "",
        "Packages: "
        + ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v is not None)
        + ".",
        "",
        (
            f"Comparisons kept from an earlier run: {', '.join(doc['kept_from_earlier_run'])}."
            if doc.get("kept_from_earlier_run")
            else ""
        ),
        "",
        "Timings are medians over inputs with the compared cases interleaved "
        "(A/B/A/B on the same input), one process per comparison.",
        "",
        "## Targets",
        "",
        "| comparison | measure | ours | target / paper | |",
        "|---|---|---|---|---|",
    ]
    for s in doc["sections"]:
        for t in s.get("targets", []):
            out.append(
                f"| {s['title'].split('.')[0]} | {t['name']} | {shown(t)} | "
                f"{t['target']} | {_holds(t['holds'])} |"
            )
    for s in doc["sections"]:
        out += ["", f"## {s['title']}", ""]
        if "error" in s:
            out += ["**failed:**", "", "```", s["error"].strip(), "```"]
            continue
        out += [f"Paper: {s['paper']}", ""] if s.get("paper", "-") != "-" else []
        out += _table(s)
        for note in s.get("notes", []):
            out += ["", f"- {note}"]
        out.append(f"\n_{s['seconds']:.0f} s_")
    return "\n".join(out) + "\n"


def _earlier_sections(path: Path, quick: bool, replaced: list[str]) -> list[dict]:
    """Sections of an earlier results.json of the same mode, minus ``replaced``."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if earlier.get("quick") != quick:
        return []
    return [
        sec
        for sec in earlier.get("sections", [])
        if sec.get("name") in COMPARISONS and sec.get("name") not in replaced
    ]


def run_case(name: str, ctx: Context, out: Path) -> None:
    """The child process: one comparison, its section written to ``out``."""
    import importlib

    module = importlib.import_module(f"benchmarks.{name}")
    os.chdir(ctx.project)  # the prepared data's image folders are project-relative
    title = f"{COMPARISONS.index(name) + 1}. {name}"
    write_section(name, title, lambda: module.run(ctx), out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.split("\n\n")[0],
        epilog="comparisons: " + ", ".join(COMPARISONS),
    )
    ap.add_argument("--quick", action="store_true", help="short schedules, fewer images (CPU)")
    ap.add_argument("--only", default="", help="comma-separated comparisons to run")
    ap.add_argument(
        "--reuse", action="store_true", help="reuse a finished bench project of the same mode"
    )
    ap.add_argument(
        "--work",
        type=Path,
        default=REPO / "benchmarks" / ".work",
        help="scratch folder (default: benchmarks/.work)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=REPO / "benchmarks",
        help="where results.md and results.json go (default: benchmarks/)",
    )
    ap.add_argument(
        "--scale",
        action="store_true",
        help="the cost curve instead (benchmarks/scale.py: stages at 400/4000/20000 "
        "images, the growth fitted, COCO train2017 projected; writes scale.md/json)",
    )
    ap.add_argument(
        "--paper",
        action="store_true",
        help="the papers' comparisons at the papers' scale on real photos instead "
        "(benchmarks/paper: VGG16, ResNet-50-FPN at 800/1333, torchvision side by side; "
        "writes paper.md/json; `python -m benchmarks --paper --help` for its options)",
    )
    ap.add_argument(
        "--pipeline-runs",
        type=int,
        default=0,
        metavar="N",
        help="repetitions of the pipeline row, each a fresh `rcnnops run` followed by the "
        "stage commands by hand (default: 3 with --quick, else 1)",
    )
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one comparison
    ap.add_argument("--case-out", type=Path, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--paper" in argv:  # its own options (and --help)
        from benchmarks import paper

        return paper.main([a for a in argv if a != "--paper"])
    args = ap.parse_args(argv)
    if args.pipeline_runs < 0:
        ap.error("--pipeline-runs: 0 (the default for the mode) or more")
    ctx = Context(args.work.resolve(), args.quick, args.pipeline_runs)
    if args.case:
        run_case(args.case, ctx, args.case_out)
        return 0
    if args.scale:
        from benchmarks import scale

        return scale.main(["--work", str(ctx.work / "scale"), "--out", str(args.out)])

    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(COMPARISONS)
    unknown = sorted(set(names) - set(COMPARISONS))
    if unknown:
        ap.error(f"unknown comparison(s) {unknown}; choose from {', '.join(COMPARISONS)}")
    from benchmarks import setup

    started = time.perf_counter()
    ctx.work.mkdir(parents=True, exist_ok=True)
    if not (args.reuse and setup.ready(ctx)):
        print(f"[setup] building the bench project in {ctx.project} ...", flush=True)
        subprocess.run(
            [sys.executable, "-m", "benchmarks.setup", "--work", str(ctx.work)]
            + (["--quick"] if ctx.quick else []),
            cwd=REPO,
            check=True,
        )
    print(f"[setup] done in {time.perf_counter() - started:.0f} s", flush=True)
    sections, failed = [], []
    for i, name in enumerate(names, 1):
        t0 = time.perf_counter()
        print(f"[{i}/{len(names)}] {name} ...", flush=True)
        case_out = ctx.work / f"{name}.json"
        case_out.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "benchmarks",
            "--case",
            name,
            "--case-out",
            str(case_out),
            "--work",
            str(ctx.work),
            "--pipeline-runs",
            str(ctx.pipeline_runs),
        ] + (["--quick"] if ctx.quick else [])
        proc = subprocess.run(cmd, cwd=REPO)
        if case_out.exists():
            section = json.loads(case_out.read_text())
        else:
            section = {
                "title": name,
                "name": name,
                "error": f"process exited with {proc.returncode}",
                "seconds": time.perf_counter() - t0,
            }
        if "error" in section:
            failed.append(name)
            print(section["error"], file=sys.stderr)
        sections.append(section)
        print(f"[{i}/{len(names)}] {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    doc = {
        "command": "python -m benchmarks"
        + (" --quick" if ctx.quick else "")
        + (f" --only {args.only}" if args.only else "")
        + (f" --pipeline-runs {args.pipeline_runs}" if args.pipeline_runs else ""),
        "quick": ctx.quick,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "minutes": (time.perf_counter() - started) / 60,
        "machine": machine(),
        "setup_stage_seconds": json.loads((ctx.project / "stage_times.json").read_text()),
        "sections": sections,
    }
    if args.only:  # keep the other comparisons of an earlier run in the same mode
        kept = _earlier_sections(args.out / "results.json", ctx.quick, names)
        if kept:
            doc["sections"] = sorted(
                kept + sections, key=lambda sec: COMPARISONS.index(sec.get("name", ""))
            )
            doc["kept_from_earlier_run"] = [sec["name"] for sec in kept]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (args.out / "results.md").write_text(markdown(doc))
    print(
        f"wrote {args.out / 'results.md'} and {args.out / 'results.json'} "
        f"({doc['minutes']:.1f} min)"
    )
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
