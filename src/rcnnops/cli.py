"""The ``rcnnops`` command.

Stage commands (``generate``, ``prepare``, ``train``, ``evaluate``) are what
``dvc.yaml`` runs; ``run`` runs the whole Prefect flow; ``register``,
``promote``, ``rollback`` and ``models`` work on the MLflow registry; ``serve``
and ``predict`` use registered models, ``compare`` sets variants side by side and
``schedule`` serves the flow on a cron schedule. All read
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
  rcnnops rollback faster_rcnn      champion back to the version it replaced
  rcnnops compare --plot            variants side by side (metrics, cost, pictures)
  rcnnops serve faster_rcnn         the champion over HTTP on 127.0.0.1:5001
  rcnnops predict faster_rcnn a.png detections of the champion on image files
  rcnnops schedule --cron "0 3 * * 1"   retrain every Monday 03:00 (Prefect)

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
    from rcnnops import distributed, train

    params = _params(args)
    if distributed.needs_launch(params.train.nproc):  # train.nproc > 1: under torchrun
        argv = ["--params", args.params, "train", "--variant", args.variant]
        distributed.launch(params.train.nproc, argv + ["--no-progress"] * args.no_progress)
    meta = train.run(params, args.variant, progress=not args.no_progress)
    if meta:  # rank 0 (the other ranks of a distributed training return nothing)
        procs = f" x {meta['world_size']} processes" if meta["world_size"] > 1 else ""
        print(
            f"trained {args.variant} in {meta['train_seconds']:.1f} s on {meta['device']}"
            f"{procs} (MLflow run {meta['run_id']})"
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
    from rcnnops.config import USES_PROPOSALS

    p = _params(args)
    proposals = None
    if args.variant in USES_PROPOSALS:
        from rcnnops.proposals.precompute import settings_from

        proposals = settings_from(p).as_dict()
    r = registry.register(
        args.variant,
        Path(p.train.out) / args.variant,
        Path(p.evaluate.out) / args.variant,
        p.register.experiment,
        proposals=proposals,
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
    rows = registry.list_versions(args.variants)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no registered rcnnops models in {tracking.tracking_uri()}")
        return 0
    cols = MODEL_COLUMNS
    cells = [[_short(c, r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return 0


MODEL_COLUMNS = (
    "model", "version", "aliases", "bbox_AP", "segm_AP", "decision",
    "git_commit", "data_hash", "params_hash", "run_id",
)  # fmt: skip


def _short(col: str, value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if col in ("git_commit", "data_hash", "params_hash", "run_id"):
        return str(value)[:12] + ("-dirty" if str(value).endswith("-dirty") else "")
    return str(value)


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
    from rcnnops.lock import project_lock

    # One run per project (params.yaml, DVC outputs, registry); taken before the
    # params edit, and before importing Prefect so a second run refuses at once.
    with project_lock(Path.cwd()):
        changes = _assignments(args)
        if changes:
            from rcnnops.config import set_params

            set_params(args.params, changes)
            print(f"{args.params}: set " + ", ".join(f"{k}={v}" for k, v in changes.items()))
        from pipelines import state

        if not args.force and (Path.cwd() / state.STATE).is_file():
            from rcnnops.config import load_params

            params = load_params(args.params)
            variants = args.variants or params.variants
            remote = state.dvc_remote(params)
            summary = state.check(Path.cwd(), variants, remote, push=not args.no_push)
            if summary:
                print(summary)
                return 0
        from pipelines.retrain import retrain  # Prefect: only when there is work

        decisions = retrain(
            project=".", variants=args.variants or None, push_to_remote=not args.no_push
        )
    for d in decisions:
        outcome = "champion" if d["promoted"] else "kept previous champion"
        print(f"{d['name']} v{d['version']}: {outcome} ({d['reason']})")
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


def cmd_rollback(args: argparse.Namespace) -> int:
    from rcnnops import registry

    r = registry.rollback(args.variant, experiment=_params(args).register.experiment)
    print(f"{r.name}: champion rolled back from v{r.from_version} to v{r.to_version}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from rcnnops import registry, serve, tracking

    experiment = _params(args).register.experiment
    mv = registry.resolve(args.variant, args.alias, experiment)
    print(f"{registry.model_name(args.variant)}@{args.alias} is version {mv.version}")
    try:
        return serve.serve(
            registry.model_uri(args.variant, args.alias),
            tracking.tracking_uri(),
            args.host,
            args.port,
            args.max_image_side,
        )
    except serve.ServeError as e:
        print(f"rcnnops serve: error: {e}", file=sys.stderr)
        return 2


def cmd_predict(args: argparse.Namespace) -> int:
    import pandas as pd

    from rcnnops import registry, serve

    images = serve.read_images(args.images)
    config = {"max_image_side": args.max_image_side} if args.max_image_side else None
    experiment = _params(args).register.experiment
    model = registry.load_pyfunc(args.variant, args.alias, experiment, config)
    frame = pd.DataFrame({"image": [b64 for _, b64 in images]})
    dets = model.predict(frame, params={"score_threshold": args.score_threshold})
    if args.json:
        out = [{"image": str(p), **d} for (p, _), d in zip(images, dets, strict=True)]
        print(json.dumps(out, indent=2))
    else:
        for (path, _), det in zip(images, dets, strict=True):
            print(serve.format_detections(path, det))
    if args.draw:
        for (path, _), det in zip(images, dets, strict=True):
            written = serve.draw(path, det, Path(args.draw))
            print(f"drew {written}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from rcnnops import compare

    p = _params(args)
    rows = compare.collect(p, args.variants)
    if not rows:
        print("nothing to compare yet: no trained variant and no champion (run `rcnnops run`)")
        return 0
    print(compare.render(rows, args.format))
    if args.plot:
        out = compare.side_by_side(p, args.variants, n_images=args.images)
        msg = f"wrote {out}" if out else "no predictions.json yet: nothing to draw"
        print(msg, file=sys.stderr if args.format in ("csv", "json") else sys.stdout)
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from pipelines import schedule

    dep = schedule.deployment(
        Path.cwd(), args.cron, args.variants, args.name, args.timezone, not args.no_push
    )
    print(
        f"serving deployment 'rcnnops-retrain/{args.name}' on '{args.cron}'"
        f"{' ' + args.timezone if args.timezone else ' (UTC)'}; Ctrl-C stops"
    )
    schedule.serve(dep)
    return 0


SERVE_EPILOG = """\
example:
  rcnnops serve faster_rcnn --port 5001 &
  python - <<'PY'
  import base64, json, urllib.request
  img = base64.b64encode(open("image.png", "rb").read()).decode()
  body = {"dataframe_records": [{"image": img}], "params": {"score_threshold": 0.5}}
  req = urllib.request.Request("http://127.0.0.1:5001/invocations", json.dumps(body).encode(),
                               {"Content-Type": "application/json"})
  print(urllib.request.urlopen(req).read().decode())
  PY
The answer is {"predictions": [{"boxes": [[x1, y1, x2, y2], ...], "labels": [...],
"names": [...], "scores": [...]} per image] (plus "masks" as COCO RLE for mask
variants); a request that is not a batch of images gets HTTP 400 with a message.
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
        "--force",
        action="store_true",
        help="run the flow even when nothing changed since the last successful run "
        "(by default that is detected in seconds and the flow is not started)",
    )
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
    sp.add_argument("--variants", nargs="+", help="only these variants (default: all)")
    sp = add(
        "rollback",
        cmd_rollback,
        "move 'champion' back to the version it replaced (from the audit trail tags)",
    )
    sp.add_argument("variant", help="e.g. faster_rcnn (model rcnnops-VARIANT)")
    sp = add(
        "serve",
        cmd_serve,
        "serve a registered model over HTTP (mlflow models serve, local environment)",
    )
    sp.formatter_class = argparse.RawDescriptionHelpFormatter
    sp.epilog = SERVE_EPILOG
    sp.add_argument("variant", help="e.g. faster_rcnn (model rcnnops-VARIANT)")
    sp.add_argument("--alias", default="champion", help="alias to serve (default: champion)")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    sp.add_argument("--port", type=int, default=5001, help="TCP port (default: 5001)")
    sp.add_argument(
        "--max-image-side",
        type=int,
        metavar="PX",
        help="refuse images longer than PX pixels on a side with HTTP 400 (default: 4096)",
    )
    sp = add("predict", cmd_predict, "run a registered model on image files; print or draw")
    sp.add_argument("variant", help="e.g. faster_rcnn (model rcnnops-VARIANT)")
    sp.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    sp.add_argument("--alias", default="champion", help="alias to load (default: champion)")
    sp.add_argument(
        "--score-threshold",
        type=float,
        default=0.5,
        help="keep detections scoring at least this (default: 0.5)",
    )
    sp.add_argument("--draw", metavar="OUTDIR", help="also write OUTDIR/<image>.png with drawings")
    sp.add_argument("--json", action="store_true", help="JSON instead of text")
    sp.add_argument("--max-image-side", type=int, metavar="PX", help="image size limit")
    sp = add(
        "compare",
        cmd_compare,
        "compare variants (latest run and champion): AP, cost, lineage; --plot draws them",
    )
    sp.add_argument("--variants", nargs="+", help="variants (default: params variants)")
    sp.add_argument(
        "--format",
        choices=("table", "markdown", "csv", "json"),
        default="table",
        help="output format (default: table; csv and json add the MLflow run ids)",
    )
    sp.add_argument(
        "--plot",
        action="store_true",
        help="also draw reports/compare/side_by_side.png (predictions on validation images)",
    )
    sp.add_argument("--images", type=int, default=3, help="validation images to draw (default: 3)")
    sp = add(
        "schedule",
        cmd_schedule,
        "serve the retraining flow as a Prefect deployment on a cron schedule (blocks)",
    )
    sp.add_argument(
        "--cron", default="0 3 * * 1", help="cron schedule (default: '0 3 * * 1', Mon 03:00)"
    )
    sp.add_argument("--timezone", help="IANA timezone of the schedule (default: UTC)")
    sp.add_argument("--variants", nargs="+", help="variants to retrain (default: params variants)")
    sp.add_argument("--name", default="scheduled", help="deployment name (default: scheduled)")
    sp.add_argument("--no-push", action="store_true", help="skip `dvc push` in each run")
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
    from rcnnops.lock import LockedError
    from rcnnops.project import StageError
    from rcnnops.train import CheckpointError, TrainingDiverged

    try:
        return args.fn(args)
    except (
        ParamsError,
        DataError,
        LockedError,
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
