"""The ``rcnnops`` command's parser and its library commands.

Stage commands (``generate``, ``prepare``, ``proposals``, ``train``,
``evaluate``) are what ``dvc.yaml`` runs; ``register``, ``promote``,
``rollback``, ``models`` and ``compare`` work on the MLflow registry; ``serve``
and ``predict`` use registered models; ``import`` converts datasets. The
orchestration commands (``run``, ``schedule``) start Prefect flows: they belong
to :mod:`pipelines.cli`, which adds them here (``rcnnops`` is that entry point;
this package never imports ``pipelines``). Each command's parser sits beside its
handler. All read ``params.yaml`` from the project folder (the current
directory, or ``-C``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from rcnnops.cli import data, registry_commands, serving, stages
from rcnnops.telemetry import no_telemetry
from rcnnops.user import name_the_user

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

AddCommands = Callable[[Any], None]


def build_parser(extra: tuple[AddCommands, ...] = ()) -> argparse.ArgumentParser:
    """The parser of every library command, plus those ``extra`` adds to the
    subcommands (the orchestration commands of :mod:`pipelines.cli`)."""
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
    for add_parsers in extra:  # `run` and `schedule` first: what most users want
        add_parsers(sub)
    for module in (stages, registry_commands, serving, data):
        module.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None, extra: tuple[AddCommands, ...] = ()) -> int:
    """Run one command; an error that explains itself (:class:`rcnnops.errors.UserError`,
    a bad value, an OS error naming its file: missing, not a folder, no permission,
    disk full) is printed on one line with exit status 2."""
    args = build_parser(extra).parse_args(argv)
    no_telemetry()  # no network: Prefect's server, MLflow and DVC send nothing
    name_the_user()  # DVC fails for a uid without a name (docker run -u, OpenShift)
    if getattr(args, "data", None):  # `-C proj run --data DIR`: DIR as the shell sees it
        args.data = _from_project(args.data, args.project)
    os.chdir(args.project)
    from rcnnops.errors import UserError

    try:
        return args.fn(args)
    except (UserError, ValueError) as e:
        print(f"rcnnops {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None and not isinstance(e, FileNotFoundError):
            raise  # not about a file the user named: the traceback says where
        print(f"rcnnops {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _from_project(path: str, project: str) -> str:
    """``path`` (relative to the shell's folder) as seen from ``project``: relative
    inside it (params.yaml stays portable), absolute outside it."""
    full, root = Path(path).resolve(), Path(project).resolve()
    return str(full.relative_to(root)) if full.is_relative_to(root) else str(full)


def exit_now(code: int) -> NoReturn:
    """End the process after a command: ``atexit`` handlers run (MLflow and
    Prefect flush there) and stdout/stderr are flushed, then the interpreter's
    teardown is skipped. With torch, MLflow and Prefect loaded, freeing every
    module and object at exit costs about 3 s on a 2-core machine, after each of
    a pipeline's stage commands (benchmarks: README, orchestration overhead).
    While a non-daemon thread still runs, the ordinary exit, which waits for it,
    is kept. The console script calls this; ``main`` itself returns."""
    import atexit
    import contextlib
    import signal
    import threading

    main = threading.main_thread()
    if any(t is not main and not t.daemon and t.is_alive() for t in threading.enumerate()):
        sys.exit(code)
    # The command is done: a Ctrl-C now printed a 30-line traceback from inside
    # torch's exit handler (and the exit status was the command's anyway).
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed, or a broken pipe
            stream.flush()
    os._exit(code)
