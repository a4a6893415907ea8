"""The stage commands ``dvc.yaml`` runs: generate, prepare, proposals, train, evaluate."""

from __future__ import annotations

import argparse
from typing import Any

from rcnnops.cli.common import add, params


def cmd_generate(args: argparse.Namespace) -> int:
    from rcnnops.data.shapes import generate

    p = params(args).generate
    out = generate(p)
    print(f"wrote {p.num_train} train + {p.num_val} val images ({len(p.classes)} classes) to {out}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from rcnnops.data import prepare

    prepare.run(params(args))
    return 0


def cmd_proposals(args: argparse.Namespace) -> int:
    from rcnnops.proposals import precompute

    precompute.run(params(args))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from rcnnops import distributed, train

    p = params(args)
    if distributed.needs_launch(p.train.nproc):  # train.nproc > 1: under torchrun
        argv = ["--params", args.params, "train", "--variant", args.variant]
        distributed.launch(p.train.nproc, argv + ["--no-progress"] * args.no_progress)
    meta = train.run(p, args.variant, progress=not args.no_progress)
    if meta:  # rank 0 (the other ranks of a distributed training return nothing)
        procs = f" x {meta['world_size']} processes" if meta["world_size"] > 1 else ""
        print(
            f"trained {args.variant} in {meta['train_seconds']:.1f} s on {meta['device']}"
            f"{procs} (MLflow run {meta['run_id']})"
        )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rcnnops import evaluate

    m = evaluate.run(params(args), args.variant, progress=not args.no_progress)
    keys = ("bbox_AP", "bbox_AP50", "bbox_AP75", "infer_ms_per_image")
    print(f"{args.variant}: " + "  ".join(f"{k}={m[k]:.4f}" for k in keys if k in m))
    return 0


def add_parsers(sub: Any) -> None:
    # Stage commands hold the project's run lock: run by hand during a pipeline run
    # they refuse; run by that run's `dvc repro`, they inherit its lock.
    add(sub, "generate", cmd_generate, "[stage] write the generated 'shapes' dataset as COCO",
        locked=True)  # fmt: skip
    add(sub, "prepare", cmd_prepare, "[stage] validate a COCO dataset and write prepared splits",
        locked=True)  # fmt: skip
    add(
        sub,
        "proposals",
        cmd_proposals,
        "[stage] selective-search proposals for both splits (+ recall report)",
        locked=True,
    )
    for name, fn, help_ in (
        ("train", cmd_train, "[stage] train one variant (resumes)"),
        ("evaluate", cmd_evaluate, "[stage] COCO-evaluate one variant"),
    ):
        sp = add(sub, name, fn, help_, locked=True)
        sp.add_argument("--variant", required=True, help="e.g. faster_rcnn")
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")
