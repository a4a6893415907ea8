"""The model registry commands: register, promote, rollback, models, compare.

Each calls the registry service (:mod:`rcnnops.registry`), as the flow's tasks do.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rcnnops.cli.common import add, known_variants, params

MODEL_COLUMNS = (
    "model", "version", "aliases", "bbox_AP", "segm_AP", "decision",
    "git_commit", "data_hash", "params_hash", "run_id",
)  # fmt: skip


def cmd_register(args: argparse.Namespace) -> int:
    from rcnnops import registry

    r = registry.register_variant(params(args), args.variant)
    print(f"{r.name} version {r.version}" + ("" if r.created else " (already registered)"))
    if r.trained_in_run:
        print(
            f"(trained in run {r.trained_in_run} of another tracking store: logged in a run "
            "made for it here, which names that run)"
        )
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from rcnnops import registry

    d = registry.promote_variant(params(args), args.variant, args.version, force=args.force)
    outcome = "promoted to champion" if d.promoted else "not promoted"
    print(f"{d.name} v{d.version}: {outcome} - {d.reason}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from rcnnops import registry

    r = registry.rollback_variant(params(args), args.variant)
    if r.completed:
        print(f"{r.name}: completed the interrupted rollback from v{r.from_version} to "
              f"v{r.to_version} (champion v{r.to_version}; roll back again to go one more "
              "step back)")  # fmt: skip
    else:
        print(f"{r.name}: champion rolled back from v{r.from_version} to v{r.to_version}")
    return 0


def _short(col: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if col in ("git_commit", "data_hash", "params_hash", "run_id"):
        return str(value)[:12] + ("-dirty" if str(value).endswith("-dirty") else "")
    return str(value)


def cmd_relocate(args: argparse.Namespace) -> int:
    import os

    from rcnnops import tracking
    from rcnnops.relocate import RelocateError, relocate

    if os.environ.get("MLFLOW_TRACKING_URI"):
        raise RelocateError(
            "MLFLOW_TRACKING_URI is set: that store's artifacts are the server's to place; "
            "relocate concerns the project's own mlflow.db"
        )
    r = relocate(Path.cwd(), tracking.DEFAULT_DB, tracking.DEFAULT_ARTIFACTS)
    if r.old is None:
        print(f"{tracking.DEFAULT_DB} already records its artifacts in this project: nothing to do")
        return 0
    print(f"artifact locations moved from {r.old} to {r.new}:")
    for where, n in r.changed.items():
        print(f"  {where}: {n}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from rcnnops import registry, tracking
    from rcnnops.tables import text_table

    tracking.setup(params(args).register.experiment)
    rows = registry.list_versions(known_variants(args.variants))
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no registered rcnnops models in {tracking.tracking_uri()}")
    else:
        print(text_table(MODEL_COLUMNS, [[_short(c, r[c]) for c in MODEL_COLUMNS] for r in rows]))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from rcnnops import compare

    known_variants(args.variants)
    p = params(args)
    rows = compare.collect(p, args.variants)
    if not rows:
        print("nothing to compare yet: no trained variant and no champion (run `rcnnops run`)")
        return 0
    print(compare.render(rows, args.format))
    if args.images is not None and not args.plot:
        print("--images draws nothing without --plot", file=sys.stderr)
    if args.plot:
        drawn = {} if args.images is None else {"n_images": args.images}
        out = compare.side_by_side(p, args.variants, **drawn)
        msg = f"wrote {out}" if out else "no predictions.json yet: nothing to draw"
        print(msg, file=sys.stderr if args.format in ("csv", "json") else sys.stdout)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from rcnnops.presets import PRESETS

    width = max(map(len, PRESETS))
    for name, (about, _) in PRESETS.items():
        print(f"{name.ljust(width)}  {about}")
    print("\nuse one: rcnnops run --preset NAME (writes its params into params.yaml)")
    return 0


MAX_DRAWN = 50  # rows of the side-by-side picture (one per image)


def _images(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= n <= MAX_DRAWN:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_DRAWN}, got {n}")
    return n


def add_parsers(sub: Any) -> None:
    add(sub, "presets", cmd_presets, "list the named param sets `run --preset` writes")
    sp = add(sub, "register", cmd_register, "register a trained, evaluated variant in MLflow",
             locked=True, tracked=True)  # fmt: skip
    sp.add_argument("variant")
    sp = add(
        sub,
        "promote",
        cmd_promote,
        "run the promotion gate: move 'champion' to VERSION if it beats the champion",
        locked=True,
        tracked=True,
    )
    sp.add_argument("variant")
    sp.add_argument("version")
    sp.add_argument("--force", action="store_true", help="promote without comparing")
    sp = add(sub, "models", cmd_models, "list registered versions with aliases and lineage",
             tracked=True)  # fmt: skip
    sp.add_argument("--json", action="store_true", help="JSON instead of a table")
    sp.add_argument("--variants", nargs="+", help="only these variants (default: all)")
    sp = add(
        sub,
        "rollback",
        cmd_rollback,
        "move 'champion' back to the version it replaced (from the audit trail tags)",
        locked=True,
        tracked=True,
    )
    sp.add_argument("variant", help="e.g. faster_rcnn (model rcnnops-VARIANT)")
    add(
        sub,
        "relocate",
        cmd_relocate,
        "after moving or copying a project: point its MLflow store at its own mlartifacts/",
        locked=True,
    )
    sp = add(
        sub,
        "compare",
        cmd_compare,
        "compare variants (latest run and champion): AP, cost, lineage; --plot draws them",
        tracked=True,
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
    sp.add_argument(
        "--images",
        type=_images,
        metavar="N",
        help=f"validation images to draw with --plot, 1 to {MAX_DRAWN} (default: 3)",
    )
