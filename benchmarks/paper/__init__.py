"""The R-CNN papers' comparisons at the papers' scale, on real photos.

    python -m benchmarks --paper [--images N|DIR] [--only ROW,ROW]   (make bench-paper)

Seven rows, each in a process of its own, on coco-mini's val photos (or the
photos in DIR) at the papers' image sizes and architectures, with random weights
(speed depends on the work, not on the weights) and the work fixed as each row
states (proposals and detections per image). Compared cases run interleaved
(A/B/A/B on the same photo); medians, their spread and the ratios go into
``benchmarks/paper.md`` and ``benchmarks/paper.json`` next to the papers'
figures, with the machine and package versions.

Rows: 1 R-CNN vs Fast R-CNN (VGG16); 2 truncated SVD (fc6 1024, fc7 256);
3 selective search fast vs quality; 4 SS + Fast R-CNN vs Faster R-CNN (VGG16);
5 the mask branch's share (ResNet-50-FPN, 800/1333, 100 detections);
6 rcnnops vs torchvision's detectors;
7 where ``rcnnops run``'s orchestration time goes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, write_section

ROWS = (
    "rcnn_vs_fast",
    "svd",
    "selective_search",
    "ss_vs_rpn",
    "mask_share",
    "peer",
    "overhead",
)
DEFAULT_IMAGES = 6  # timed photos per row (the first is a warm-up): fits 40 min on 2 cores
SEARCH_FACTOR = 3  # row 3 searches this many times more photos (recall needs objects)


def markdown(doc: dict) -> str:
    from benchmarks.__main__ import _holds, _table
    from benchmarks.common import shown

    m = doc["machine"]
    out = [
        "# rcnnops at the papers' scale",
        "",
        f"`{doc['command']}`, {doc['finished']}, {doc['minutes']:.1f} min; "
        f"{doc['images']} photos timed per row ({doc['search_images']} for selective "
        f"search) from {doc['source']}.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM, "
        f"{m['cuda'] or 'no GPU (CPU)'}; {m['platform']}, Python {m['python']}, "
        f"torch threads {m['torch_threads']}; rcnnops {m['git']}.",
        "",
        "Packages: "
        + ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v is not None)
        + ".",
        "",
        "Random weights (seeded): speed depends on the work, which each row fixes. "
        "Cases interleaved A/B/A/B on each photo, the first photo a warm-up; medians "
        "with their spread (min-max of the timings, or the IQR of per-photo ratios).",
        "",
        "## Targets",
        "",
        "| row | measure | ours | target / paper | |",
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
        for table in s.get("tables", [s]):
            out += _table(table) + [""]
        for note in s.get("notes", []):
            out += [f"- {note}"]
        out.append(f"\n_{s['seconds']:.0f} s_")
    return "\n".join(out) + "\n"


def run_case(name: str, ctx_json: str, out: Path) -> None:
    """The child process: one row, its section written to ``out``."""
    import importlib

    from benchmarks.paper.common import Ctx

    ctx = Ctx.from_json(ctx_json)
    module = importlib.import_module(f"benchmarks.paper.{name}")
    title = f"{ROWS.index(name) + 1}. {name}"
    write_section(name, title, lambda: module.run(ctx), out)


def main(argv: list[str] | None = None) -> int:
    import subprocess

    ap = argparse.ArgumentParser(
        prog="python -m benchmarks --paper",
        description=__doc__.split("\n\n")[0],
        epilog="rows: " + ", ".join(ROWS),
    )
    ap.add_argument(
        "--images",
        default=str(DEFAULT_IMAGES),
        metavar="N|DIR",
        help=f"N of coco-mini's val photos (default {DEFAULT_IMAGES}; selective search "
        f"takes {SEARCH_FACTOR}x as many), or a folder of photos",
    )
    ap.add_argument("--only", default="", help="comma-separated rows to run (default: all)")
    ap.add_argument("--work", type=Path, default=REPO / "benchmarks" / ".work" / "paper")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks", help="for paper.md/json")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one row
    ap.add_argument("--ctx", help=argparse.SUPPRESS)
    ap.add_argument("--case-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case:
        run_case(args.case, args.ctx, args.case_out)
        return 0

    from benchmarks.__main__ import machine
    from benchmarks.paper.common import Ctx, photos

    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(ROWS)
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        ap.error(f"unknown row(s) {unknown}; choose from {', '.join(ROWS)}")
    count = int(args.images) if args.images.isdigit() else DEFAULT_IMAGES
    if count < 2:
        ap.error("--images: at least 2 (the first photo is a warm-up)")
    spec = str(SEARCH_FACTOR * count) if args.images.isdigit() else args.images
    found, annotations = photos(spec, SEARCH_FACTOR * count)
    ctx = Ctx(args.work.resolve(), tuple(found[:count]), tuple(found), annotations)
    ctx.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sections, failed = [], []
    for i, name in enumerate(names, 1):
        t0 = time.perf_counter()
        print(f"[{i}/{len(names)}] {name} ...", flush=True)
        case_out = ctx.work / f"{name}.json"
        case_out.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "benchmarks.paper", "--case", name, "--ctx", ctx.to_json()]
        proc = subprocess.run(cmd + ["--case-out", str(case_out)], cwd=REPO)
        if case_out.exists():
            section = json.loads(case_out.read_text())
        else:
            section = {
                "title": f"{ROWS.index(name) + 1}. {name}",
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
        "command": "python -m benchmarks --paper"
        + (f" --images {args.images}" if args.images != str(DEFAULT_IMAGES) else "")
        + (f" --only {args.only}" if args.only else ""),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "minutes": (time.perf_counter() - started) / 60,
        "images": len(ctx.images),
        "search_images": len(ctx.search_images),
        "source": str(ctx.images[0].parent),
        "machine": machine(),
        "sections": sections,
    }
    if args.only:  # keep the other rows of an earlier run
        try:
            earlier = json.loads((args.out / "paper.json").read_text())["sections"]
        except (OSError, ValueError, KeyError):
            earlier = []
        kept = [s for s in earlier if s.get("name") in ROWS and s.get("name") not in names]
        doc["sections"] = sorted(kept + sections, key=lambda s: ROWS.index(s["name"]))
        doc["kept_from_earlier_run"] = [s["name"] for s in kept]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "paper.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (args.out / "paper.md").write_text(markdown(doc))
    print(f"wrote {args.out / 'paper.md'} and paper.json ({doc['minutes']:.1f} min)")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
