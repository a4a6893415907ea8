"""The ``rcnnops`` command.

Stage commands (``generate``, ``prepare``, ``train``, ``evaluate``) are what
``dvc.yaml`` runs; ``run`` runs the whole Prefect flow; ``register``,
``promote`` and ``models`` work on the MLflow registry. All read
``params.yaml`` from the project folder (the current directory, or ``-C``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EPILOG = """\
typical use:
  rcnnops run                       the whole pipeline (DVC-cached, MLflow-tracked)
  rcnnops run --data ~/coco --epochs 2   the same on your own COCO dataset
  rcnnops train --variant faster_rcnn   one stage by hand (what `dvc repro train@faster_rcnn` runs)
  rcnnops models                    registered versions, aliases and metrics
  rcnnops promote faster_rcnn 3     run the promotion gate for version 3

Tracking goes to $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the project;
the flow uses $PREFECT_API_URL, else Prefect's ephemeral local API.
"""


def _params(args: argparse.Namespace):
    from rcnnops.config import load_params

    return load_params(args.params)


def cmd_generate(args: argparse.Namespace) -> int:
    from rcnnops.data.shapes import generate

    p = _params(args).generate
    out = generate(p)
    print(f"wrote {p.num_train} train + {p.num_val} val images ({len(p.classes)} classes) to {out}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from rcnnops.data import prepare

    prepare.run(_params(args))
    return 0


def cmd_proposals(args: argparse.Namespace) -> int:
    from rcnnops.proposals import precompute

    precompute.run(_params(args))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from rcnnops import train

    meta = train.run(_params(args), args.variant, progress=not args.no_progress)
    print(
        f"trained {args.variant} in {meta['train_seconds']:.1f} s on {meta['device']} "
        f"(MLflow run {meta['run_id']})"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rcnnops import evaluate

    m = evaluate.run(_params(args), args.variant, progress=not args.no_progress)
    keys = ("bbox_AP", "bbox_AP50", "bbox_AP75", "infer_ms_per_image")
    print(f"{args.variant}: " + "  ".join(f"{k}={m[k]:.4f}" for k in keys if k in m))
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from rcnnops import registry

    p = _params(args)
    r = registry.register(
        args.variant,
        Path(p.train.out) / args.variant,
        Path(p.evaluate.out) / args.variant,
        p.register.experiment,
    )
    print(f"{r.name} version {r.version}" + ("" if r.created else " (already registered)"))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from rcnnops import registry

    p = _params(args)
    d = registry.promote(
        args.variant,
        args.version,
        p.register.metric_for(args.variant),
        p.register.min_improvement,
        force=args.force,
        experiment=p.register.experiment,
    )
    print(
        f"{d.name} v{d.version}: {'promoted to champion' if d.promoted else 'not promoted'}"
        f" - {d.reason}"
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from rcnnops import registry, tracking

    p = _params(args)
    tracking.setup(p.register.experiment)
    client = tracking.client()
    rows = []
    for rm in client.search_registered_models("name LIKE 'rcnnops-%'"):
        aliases = {}
        for alias, version in (rm.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for mv in registry._versions(rm.name):
            rows.append(
                {
                    "model": rm.name,
                    "version": mv.version,
                    "aliases": ",".join(sorted(aliases.get(str(mv.version), []))),
                    "bbox_AP": mv.tags.get("metric.bbox_AP", ""),
                    "decision": mv.tags.get("promotion.decision", ""),
                    "data_hash": mv.tags.get("data_hash", "")[:12],
                    "git_commit": mv.tags.get("git_commit", "")[:12],
                    "run_id": mv.run_id,
                }
            )
    rows.sort(key=lambda r: (r["model"], int(r["version"])))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no registered rcnnops models in {tracking.tracking_uri()}")
        return 0
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    return 0


def _assignments(args: argparse.Namespace) -> dict:
    """``--data`` and ``--set KEY=VALUE`` as params assignments (values are YAML)."""
    import yaml

    from rcnnops.config import ParamsError

    out: dict = {}
    if getattr(args, "data", None):
        from rcnnops.data.prepare import find_coco_splits

        out.update({f"data.{k}": v for k, v in find_coco_splits(Path(args.data)).items()})
    if getattr(args, "epochs", None):
        out["train.*.epochs"] = args.epochs
    for item in getattr(args, "set", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParamsError(f"--set {item!r}: expected KEY=VALUE, e.g. train.faster_rcnn.lr=0.01")
        out[key.strip()] = yaml.safe_load(value)
    return out


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.retrain import retrain

    changes = _assignments(args)
    if changes:
        from rcnnops.config import set_params

        set_params(args.params, changes)
        print(f"{args.params}: set " + ", ".join(f"{k}={v}" for k, v in changes.items()))
    decisions = retrain(
        project=".", variants=args.variants or None, push_to_remote=not args.no_push
    )
    for d in decisions:
        state = "champion" if d["promoted"] else "kept previous champion"
        print(f"{d['name']} v{d['version']}: {state} ({d['reason']})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from rcnnops.data import importers

    if args.format == "voc":
        result = importers.import_voc(
            Path(args.src),
            Path(args.out),
            split=args.split,
            classes=importers.parse_classes(args.classes) if args.classes else None,
            skip_difficult=args.skip_difficult,
        )
    else:
        result = importers.import_masks(
            Path(args.images),
            Path(args.masks),
            Path(args.out),
            split=args.split,
            class_name=args.class_name,
            ignore_value=args.ignore_value,
            allow_missing_masks=args.allow_missing_masks,
            mask_suffix=args.mask_suffix,
        )
    print(f"imported {args.format} split {args.split}: {result.summary()}")
    return 0


IMPORT_EPILOG = """\
Writes OUT/annotations/instances_SPLIT.json (no images are copied). Point
params.yaml at it (the command prints the images folder relative to OUT):
  data:
    root: OUT
    train: {annotations: annotations/instances_train.json, images: IMAGES}
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rcnnops",
        description="Retraining pipeline for the R-CNN family of detectors.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-C",
        "--project",
        default=".",
        help="project folder holding params.yaml and dvc.yaml (default: .)",
    )
    parser.add_argument(
        "--params",
        default="params.yaml",
        help="params file, relative to the project (default: params.yaml)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        return sp

    r = add("run", cmd_run, "run the whole retraining flow (Prefect + DVC + MLflow)")
    r.add_argument("--variants", nargs="+", help="variants to run (default: params variants)")
    r.add_argument("--no-push", action="store_true", help="skip `dvc push` at the end")
    r.add_argument(
        "--data",
        metavar="DIR",
        help="use the COCO dataset in DIR (DIR/annotations/instances_<split>.json + "
        "DIR/<split>/ images): rewrites params.yaml's data section",
    )
    r.add_argument(
        "--epochs", type=int, metavar="N", help="train every variant for N epochs (train.*.epochs)"
    )
    r.add_argument(
        "--set",
        "-S",
        action="append",
        metavar="KEY=VALUE",
        help="set a param in params.yaml before running, as `dvc exp run -S` does "
        "(repeatable; `*` matches every key at one level, e.g. train.*.batch_size=2)",
    )
    add("generate", cmd_generate, "[stage] write the generated 'shapes' dataset as COCO")
    add("prepare", cmd_prepare, "[stage] validate a COCO dataset and write prepared splits")
    add(
        "proposals",
        cmd_proposals,
        "[stage] selective-search proposals for both splits (+ recall report)",
    )
    for name, fn, help_ in (
        ("train", cmd_train, "[stage] train one variant (resumes)"),
        ("evaluate", cmd_evaluate, "[stage] COCO-evaluate one variant"),
    ):
        sp = add(name, fn, help_)
        sp.add_argument("--variant", required=True, help="e.g. faster_rcnn")
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")
    sp = add("register", cmd_register, "register a trained, evaluated variant in MLflow")
    sp.add_argument("variant")
    sp = add(
        "promote",
        cmd_promote,
        "run the promotion gate: move 'champion' to VERSION if it beats the champion",
    )
    sp.add_argument("variant")
    sp.add_argument("version")
    sp.add_argument("--force", action="store_true", help="promote without comparing")
    sp = add("models", cmd_models, "list registered versions with aliases and lineage")
    sp.add_argument("--json", action="store_true", help="JSON instead of a table")
    sp = add("import", cmd_import, "convert a Pascal VOC or instance-mask PNG dataset to COCO")
    fmt = sp.add_subparsers(dest="format", required=True, metavar="FORMAT")
    raw = argparse.RawDescriptionHelpFormatter
    v = fmt.add_parser(
        "voc",
        help="Pascal VOC folder (Annotations/*.xml, JPEGImages/*) -> COCO boxes",
        description="Convert a Pascal VOC folder to COCO boxes. VOC's 1-based inclusive\n"
        "corners become [xmin-1, ymin-1, xmax-xmin+1, ymax-ymin+1] (as detectron2 reads VOC).",
        epilog=IMPORT_EPILOG,
        formatter_class=raw,
    )
    v.add_argument("src", metavar="SRC", help="VOC folder holding Annotations/ and JPEGImages/")
    v.add_argument("out", metavar="OUT", help="output folder (gets annotations/)")
    v.add_argument(
        "--split",
        default="train",
        help="split name; uses SRC/ImageSets/Main/SPLIT.txt if present, else every XML "
        "(default: train)",
    )
    v.add_argument(
        "--classes",
        metavar="A,B,...",
        help="comma-separated class names (default: the 20 VOC classes)",
    )
    v.add_argument(
        "--skip-difficult", action="store_true", help="drop (and count) difficult objects"
    )
    m = fmt.add_parser(
        "masks",
        help="images + instance-mask PNGs (one value per instance) -> COCO RLE masks",
        description="Convert images + instance-mask PNGs to COCO RLE masks.\n"
        "MASKS/<stem>.png belongs to IMAGES/<stem>.<ext>; each distinct non-zero value is\n"
        "one instance. One class for all (--class-name) or one subfolder per class\n"
        "(MASKS/<class>/<stem>.png).",
        epilog=IMPORT_EPILOG,
        formatter_class=raw,
    )
    m.add_argument("--images", required=True, metavar="DIR", help="folder of images")
    m.add_argument(
        "--masks", required=True, metavar="DIR", help="folder of mask PNGs (or of class subfolders)"
    )
    m.add_argument("out", metavar="OUT", help="output folder (gets annotations/)")
    m.add_argument("--split", default="train", help="split name (default: train)")
    m.add_argument(
        "--class-name", metavar="NAME", help="every instance is this class (no class subfolders)"
    )
    m.add_argument(
        "--ignore-value",
        type=int,
        metavar="N",
        help="mask value that is not an instance, e.g. 255 for void (default: none)",
    )
    m.add_argument(
        "--allow-missing-masks",
        action="store_true",
        help="keep (and count) images without a mask, with no annotations",
    )
    m.add_argument(
        "--mask-suffix",
        default="",
        metavar="SUFFIX",
        help="mask name suffix before .png, e.g. _mask for PennFudanPed (default: none)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # No network: Prefect's local server must not try to send telemetry.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.chdir(args.project)
    from rcnnops.config import ParamsError
    from rcnnops.data.coco import DataError
    from rcnnops.project import StageError
    from rcnnops.train import CheckpointError, TrainingDiverged

    try:
        return args.fn(args)
    except (
        ParamsError,
        DataError,
        StageError,
        CheckpointError,
        TrainingDiverged,
        FileNotFoundError,
        ValueError,
    ) as e:
        print(f"rcnnops {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
