"""Rehearse `rcnnops run --preset finetune-coco` on real photos with no network.

Every ``torchvision:`` weights name the preset uses is placed in a temporary
torch.hub cache (``$TORCH_HOME``) as a file made by torchvision's own constructor
with ``weights=None`` (seed 0), under the real file name, as a first online run
would leave it. Then the whole flow runs in ``--project`` (a git checkout of
rcnnops: it is changed) on ``--data`` (default ../shared/data/coco-mini), and the
wall time of each DVC stage is printed from the flow's own log.

The weights are random, so the accuracy says nothing; the rehearsal shows that
every stage completes on real photos at the preset's sizes, that every variant is
registered, and what the weights report says was loaded and re-initialised.

    python -m benchmarks.finetune_rehearsal --project /tmp/clone --epochs 1 \\
        --set train.rcnn.model.proposals_test=100
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def place_weights(names: list[str], torch_home: Path) -> list[Path]:
    """A constructor-made file in ``torch_home``'s hub cache for each weights name."""
    import torch
    from torchvision.models import get_model_builder, get_model_weights, get_weight, list_models

    os.environ["TORCH_HOME"] = str(torch_home)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    placed = []
    for name in names:
        weights = get_weight(name)
        path = cache / os.path.basename(weights.url)
        if not path.is_file():
            builder = next(
                get_model_builder(m) for m in list_models() if get_model_weights(m) is type(weights)
            )
            kwargs = {"weights": None}
            if "weights_backbone" in inspect.signature(builder).parameters:
                kwargs["weights_backbone"] = None  # never a download
            torch.manual_seed(0)
            torch.save(builder(**kwargs).state_dict(), path)
        placed.append(path)
    return placed


def subset(data: Path, out: Path, n: int) -> Path:
    """A COCO dataset in ``out`` with the first ``n`` images (by id) of each of
    ``data``'s splits, every annotation of those images kept, images copied
    (``prepare`` refuses symlinks that lead out of the image folder)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(exist_ok=True)
    for ann in sorted((data / "annotations").glob("instances_*.json")):
        split = ann.stem.removeprefix("instances_")
        coco = json.loads(ann.read_text())
        images = sorted(coco["images"], key=lambda im: im["id"])[:n]
        ids = {im["id"] for im in images}
        coco["images"] = images
        coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in ids]
        (out / "annotations" / ann.name).write_text(json.dumps(coco))
        (out / split).mkdir(exist_ok=True)
        for im in images:
            shutil.copyfile(data / split / im["file_name"], out / split / im["file_name"])
        print(f"subset {split}: {len(images)} images, {len(coco['annotations'])} annotations")
    return out


def _stage_times(lines: list[tuple[float, str]]) -> dict[str, float]:
    """Seconds per DVC stage: from DVC's "Running stage 'X'" to its "Updating lock file"."""
    took, current = {}, None
    for t, line in lines:
        if m := re.search(r"Running stage '([^']+)'", line):
            current = (m.group(1), t)
        elif line.startswith("Updating lock file") and current:
            took[current[0]] = t - current[1]
            current = None
    return took


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", type=Path, required=True, help="an rcnnops git checkout")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/coco-mini")
    ap.add_argument("--preset", default="finetune-coco")
    ap.add_argument("--epochs", type=int, default=None, help="train.*.epochs (default: preset)")
    ap.add_argument("--set", "-S", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--subset",
        type=int,
        default=None,
        metavar="N",
        help="use only the first N images of each split (written to <project>/.data-subset)",
    )
    ap.add_argument("--log", type=Path, default=None, help="write the timed log here too")
    args = ap.parse_args(argv)

    from rcnnops.presets import PRESETS

    names = sorted(
        {
            v["pretrained"].removeprefix("torchvision:")
            for k, v in PRESETS[args.preset][1].items()
            if k.endswith(".model") and str(v.get("pretrained", "")).startswith("torchvision:")
        }
        | {
            s.split("=", 1)[1].removeprefix("torchvision:")
            for s in args.set
            if s.split("=", 1)[0].endswith(".pretrained") and "torchvision:" in s
        }
    )
    torch_home = args.project.resolve() / ".torch-rehearsal"
    for path in place_weights(names, torch_home):
        print(f"placed {path} (torchvision constructor, weights=None, seed 0)")
    data = args.data.resolve()
    if args.subset:
        data = subset(data, args.project.resolve() / ".data-subset", args.subset)
    bin_dir = Path(sys.executable).parent  # rcnnops and dvc of this environment
    cmd = [str(bin_dir / "rcnnops"), "run", "--data", str(data)]
    cmd += ["--preset", args.preset]
    cmd += ["--epochs", str(args.epochs)] if args.epochs else []
    cmd += [a for s in args.set for a in ("--set", s)]
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ, TORCH_HOME=str(torch_home), PYTHONUNBUFFERED="1")
    env["PATH"] = str(bin_dir) + os.pathsep + env.get("PATH", "")
    start = time.monotonic()
    lines: list[tuple[float, str]] = []
    log = args.log.open("w") if args.log else None
    with subprocess.Popen(
        cmd, cwd=args.project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        for line in proc.stdout:
            t = time.monotonic() - start
            lines.append((t, line))
            stamped = f"[{t:8.1f}s] {line}"
            sys.stdout.write(stamped)
            if log:
                log.write(stamped)
                log.flush()
    took = time.monotonic() - start
    print(f"\nrcnnops run: exit {proc.returncode} after {took / 60:.1f} min")
    print("| stage | wall s |\n|---|---|")
    for stage, seconds in _stage_times(lines).items():
        print(f"| {stage} | {seconds:.0f} |")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
