"""What every command shares: how it is added to the parser and reads params."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

Handler = Callable[[argparse.Namespace], int]


def add(
    sub: Any,
    name: str,
    fn: Handler,
    help_: str,
    locked: bool = False,
    tracked: bool = False,
    **kwargs: Any,
) -> argparse.ArgumentParser:
    """A subcommand ``name`` running ``fn(args)``; its help is also its description.
    ``locked``: it holds the project's run lock (see :mod:`rcnnops.lock`), so it
    refuses while a pipeline run is going, and a run refuses while it goes (the
    run's own stage commands inherit the run's lock). ``tracked``: it talks to the
    MLflow tracking store, so a server that does not answer is one line at once
    (MLflow's client retries for minutes, then fails with a traceback), also when
    it goes away during the command."""
    sp = sub.add_parser(name, help=help_, description=help_, **kwargs)
    handler = _tracked(fn) if tracked else fn
    sp.set_defaults(fn=_locked(handler) if locked else handler)
    return sp


def _tracked(fn: Handler) -> Handler:
    def run(args: argparse.Namespace) -> int:
        from rcnnops import tracking

        then = "try again once it answers, or set MLFLOW_TRACKING_URI to one that does"
        tracking.check_reachable(then=then)
        with tracking.unreachable_explained(then):
            return fn(args)

    run.__name__ = run.__qualname__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def _locked(fn: Handler) -> Handler:
    def run(args: argparse.Namespace) -> int:
        from rcnnops.lock import project_lock

        with project_lock(Path.cwd()):
            return fn(args)

    run.__name__ = run.__qualname__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def params(args: argparse.Namespace):
    """The project's validated params (``--params``, relative to ``-C``); Pillow
    then opens the images they allow (:mod:`rcnnops.data.pixels`)."""
    from rcnnops.config import load_params
    from rcnnops.data.pixels import allow_pixels

    p = load_params(args.params)
    allow_pixels(max(p.prepare.max_image_pixels, p.serve.max_image_pixels))
    return p


def assignments(
    data: str | None = None, epochs: int | None = None, sets: list[str] | None = None
) -> dict[str, Any]:
    """``--data DIR``, ``--epochs N`` and ``--set KEY=VALUE`` as params assignments
    (values are YAML), for :func:`rcnnops.params_edit.set_params`."""
    from rcnnops.config import ParamsError
    from rcnnops.params_errors import read_yaml

    out: dict[str, Any] = {}
    if data is not None:
        from rcnnops.data.prepare import find_coco_splits

        out.update({f"data.{k}": v for k, v in find_coco_splits(Path(data)).items()})
    if epochs is not None:  # 0 too: params refuse it, naming the field
        out["train.*.epochs"] = epochs
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParamsError(f"--set {item!r}: expected KEY=VALUE, e.g. train.faster_rcnn.lr=0.01")
        out[key.strip()] = read_yaml(value, f"--set {item!r}")
    return out


def known_variants(names: list[str] | None) -> list[str] | None:
    """``--variants`` as given, or a one-line error naming those that are not
    variants (they were left out without a word: a typo compared nothing)."""
    from rcnnops.config import VARIANTS

    unknown = [n for n in names or [] if n not in VARIANTS]
    if unknown:
        raise ValueError(
            f"--variants: unknown {', '.join(unknown)} (variants: {', '.join(VARIANTS)})"
        )
    return names
