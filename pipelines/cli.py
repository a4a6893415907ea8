"""The ``rcnnops`` command: the library's commands (:mod:`rcnnops.cli`) plus the two
that start Prefect, ``run`` (the retraining flow, now) and ``schedule`` (the flow
as a deployment on a cron schedule).

The orchestration layer sits above the library: this module imports
``rcnnops.cli``, never the reverse. Prefect is imported only when a flow starts.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any, NoReturn

from rcnnops.cli import exit_now
from rcnnops.cli import main as library_main
from rcnnops.cli.common import add, assignments, known_variants


def cmd_run(args: argparse.Namespace) -> int:
    from rcnnops.lock import project_lock

    # One run per project (params.yaml, DVC outputs, registry); taken before the
    # params edit, and before importing Prefect so a second run refuses at once.
    known_variants(args.variants)  # a typo stops here, not at its train stage
    with project_lock(Path.cwd()):
        named, given = preset(args.preset), assignments(args.data, args.epochs, args.set)
        changes = named | given
        if changes:
            from rcnnops.params_edit import set_params

            set_params(args.params, changes)
            shown = [f"preset {args.preset} ({len(named)} keys)"] * bool(named)
            print(
                f"{args.params}: set " + ", ".join(shown + [f"{k}={v}" for k, v in given.items()])
            )
        if not args.force and (summary := _up_to_date(args)):
            print(summary)
            return 0
        from pipelines.local_api import local_api

        with local_api(meanwhile=_import_flow_modules):  # Prefect: only when there is work
            from pipelines import flush_logs
            from pipelines.decisions import decision_word
            from pipelines.retrain import retrain

            try:
                decisions = retrain(
                    project=".", variants=args.variants or None, push_to_remote=not args.no_push
                )
            finally:
                flush_logs()
    for d in decisions:
        outcome = {
            "promoted": "champion",
            "kept": "kept previous champion",
            "unchanged": "unchanged",
        }[decision_word(d)]
        print(f"{d['name']} v{d['version']}: {outcome} ({d['reason']})")
    _print_ui_hint(args)
    return 0


def _import_flow_modules() -> None:
    """Import, while Prefect's local API starts (about 4 s, on the other core), what
    the flow's process needs: the flow and Prefect, the prepared data's manifest
    reader (the version-data task reads it between two stages), DVC's repository
    modules (the first tasks set DVC up and ask it what changed, in this process)
    and MLflow (the tracking-store task, the flow's first beside the stages, needs
    it first): about 2.2 s of CPU. Then, in the time the server still takes, what
    the later tasks would load beside the stages, where its CPU would be taken from
    them: MLflow's SQL stores (0.8 s) and the registry's modules (the warm-up
    task's); only an optimisation, so a failure there is left to the task that
    needs the module. Neither torch nor matplotlib loads in this process (the
    comparison's picture is drawn in a process of its own)."""
    import contextlib

    import dvc.repo.status  # noqa: F401
    import dvc.stage  # noqa: F401

    import pipelines.retrain  # noqa: F401
    import rcnnops.data.prepare  # noqa: F401
    import rcnnops.tracking  # noqa: F401

    with contextlib.suppress(Exception):
        import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401

        from rcnnops import registry

        registry.warm_up()


def _print_ui_hint(args: argparse.Namespace) -> None:
    """Where to look at the runs; a hint, so nothing it meets fails the run."""
    from rcnnops import tracking
    from rcnnops.config import load_params

    with contextlib.suppress(Exception):  # no params, or no store: no hint
        print(tracking.ui_hint(load_params(args.params).register.experiment))


def preset(name: str | None) -> dict[str, Any]:
    if not name:
        return {}
    from rcnnops.presets import assignments as preset_assignments

    return preset_assignments(name)


def _up_to_date(args: argparse.Namespace) -> str | None:
    """The explanation when a run would change nothing (see :mod:`pipelines.state`)."""
    from pipelines import state

    if not (Path.cwd() / state.STATE).is_file():
        return None
    from rcnnops.config import load_params

    params = load_params(args.params)
    variants = args.variants or params.variants
    return state.check(Path.cwd(), variants, state.dvc_remote(params), push=not args.no_push)


def cmd_schedule(args: argparse.Namespace) -> int:
    from pipelines import schedule

    known_variants(args.variants)

    dep = schedule.deployment(
        Path.cwd(), args.cron, args.variants, args.name, args.timezone, not args.no_push
    )
    print(
        f"serving deployment 'rcnnops-retrain/{args.name}' on '{args.cron}'"
        f"{' ' + args.timezone if args.timezone else ' (UTC)'}; Ctrl-C stops"
    )
    schedule.serve(dep)
    return 0


def add_parsers(sub: Any) -> None:
    """``run`` and ``schedule``, added to the library's subcommands."""
    r = add(sub, "run", cmd_run, "run the whole retraining flow (Prefect + DVC + MLflow)")
    r.add_argument("--variants", nargs="+", help="variants to run (default: params variants)")
    r.add_argument("--no-push", action="store_true", help="skip `dvc push` at the end")
    force = "run the flow even if nothing changed since the last successful run (else: seconds)"
    r.add_argument("--force", action="store_true", help=force)
    r.add_argument(
        "--data",
        metavar="DIR",
        help="use the COCO dataset in DIR (DIR/annotations/instances_<split>.json + "
        "DIR/<split>/ images): rewrites params.yaml's data section",
    )
    r.add_argument(
        "--preset",
        metavar="NAME",
        help="write a named set of params into params.yaml first (`rcnnops presets` lists "
        "them; --data, --epochs and --set apply after it)",
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
    sp = add(
        sub,
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


def main(argv: list[str] | None = None) -> int:
    return library_main(argv, extra=(add_parsers,))


def console() -> NoReturn:
    """The ``rcnnops`` console script: :func:`main`, then a quick exit
    (:func:`rcnnops.cli.exit_now`)."""
    exit_now(main())


if __name__ == "__main__":
    console()
