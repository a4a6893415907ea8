"""The project folder and DVC: initialise, configure the default remote, run stages.

DVC owns files and caching; this module drives its command line (``dvc
repro`` is not in ``dvc.api``) with the running interpreter, so the stage
commands find the same ``rcnnops`` and packages. Initialising and configuring
(``dvc init``, ``dvc config``, ``dvc remote add``) use DVC's ``Repo.init`` and
``Config`` in this process instead: the commands are thin wrappers of them, and
each command's start costs about a second.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from rcnnops import dvc_launcher
from rcnnops.errors import UserError
from rcnnops.redact import redact
from rcnnops.telemetry import NO_TELEMETRY

DEFAULT_REMOTE_NAME = "local"
DEFAULT_REMOTE_DIR = ".dvcremote"  # inside the project, git-ignored
TEAM_REMOTE = "rcnnops"  # the name given to a remote set by params or $RCNNOPS_DVC_REMOTE


class StageError(UserError, RuntimeError):
    """A DVC command failed; the message carries its output's tail."""


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for child commands: this interpreter's bin first on PATH."""
    e = dict(os.environ) | (extra or {})
    bin_dir = str(Path(sys.executable).parent)
    e["PATH"] = bin_dir + os.pathsep + e.get("PATH", "")
    e |= {k: v for k, v in NO_TELEMETRY.items() if k not in e}
    return e


def dvc(
    project: Path,
    *args: str,
    check: bool = True,
    capture: bool = False,
    timeout: float | None = None,
    extra_env: dict[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``dvc ARGS`` in ``project`` with this interpreter (``extra_env`` added
    to its environment).

    Without ``capture`` the output streams through (progress stays visible), each
    finished line goes to ``on_line``, and the last lines go into the
    :class:`StageError` raised on failure.
    """
    # --wait-for-lock: the flow runs stages of several variants at once; DVC
    # releases its repo lock while a stage's command runs and takes it briefly
    # before and after, so concurrent `dvc repro`s queue there instead of failing.
    argv = ["--wait-for-lock", *args]
    cmd = _command(argv)
    if capture:
        proc = subprocess.run(
            cmd, cwd=project, env=env(extra_env), text=True, timeout=timeout, capture_output=True
        )
        out = (proc.stdout or "") + (proc.stderr or "")
    else:
        # Stream raw bytes so progress bars (carriage returns) stay live; keep a tail.
        code, out = _stream(argv, project, env(extra_env), timeout, on_line)
        proc = subprocess.CompletedProcess(cmd, code, out, "")
    if check and proc.returncode != 0:
        errors = [ln for ln in out.splitlines() if "error" in ln.lower()]
        detail = "\n".join(errors[-5:] or out.strip().splitlines()[-15:])
        raise StageError(
            redact(
                f"`dvc {' '.join(args)}` failed in {project} "
                f"(exit {proc.returncode})" + (f":\n{detail}" if detail else "")
            )
        )
    return proc


def _git_toplevel(project: Path) -> Path | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"],
            cwd=project,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except OSError:
        return None
    if out.returncode != 0:
        return None
    top, here = Path(out.stdout.strip()).resolve(), project.resolve()
    if top == here:
        return top
    # A project in a folder the enclosing repository ignores is not part of it
    # (DVC refuses `init --subdir` there): treat it as outside any repository.
    ignored = subprocess.run(["git", "check-ignore", "-q", str(here)], cwd=project, timeout=10)
    return None if ignored.returncode == 0 else top


def _config(project: Path):
    """DVC's configuration of ``project`` (all levels, as ``dvc config`` reads
    them), in this process: DVC's own ``Config``, which its config commands edit."""
    from dvc.config import Config

    return Config(dvc_dir=str(Path(project).resolve() / ".dvc"))


def _flat(conf: dict, prefix: str = "") -> Iterator[tuple[str, str]]:
    for key, value in conf.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", str(value)


def dvc_config(project: Path) -> dict[str, str]:
    """DVC's merged configuration as ``section.key`` -> value (``dvc config --list``
    plus DVC's defaults; folders absolute)."""
    return dict(_flat(_config(project)))


def remote_url(project: Path, remote: str) -> str:
    """A remote as DVC lists it: URLs as given, folders absolute (relative to the project)."""
    if "://" in remote:
        return remote
    return str((Path(project) / Path(remote).expanduser()).resolve())


def ensure_dvc(project: Path, remote: str | None = DEFAULT_REMOTE_DIR) -> list[str]:
    """Initialise DVC in ``project`` if needed and make ``remote`` its default remote.

    ``remote``: a folder (relative to the project) or a URL (``s3://...``); None
    keeps the project's own default remote (a local folder if it has none). A
    remote other than the tracked default is written to ``.dvc/config.local``
    (this checkout only, never committed). Returns what it did."""
    project = Path(project).resolve()
    done = []
    if not (project / ".dvc").is_dir():
        top = _git_toplevel(project)
        flags = [] if top == project else (["--subdir"] if top else ["--no-scm"])
        _init(project, flags)
        done.append("initialised DVC" + (f" ({' '.join(flags)})" if flags else ""))
    config = dvc_config(project)
    default = config.get("core.remote")
    current = config.get(f"remote.{default}.url") if default else None
    if remote is None and current:
        return done
    want = remote_url(project, remote or DEFAULT_REMOTE_DIR)
    if current != want:
        name = DEFAULT_REMOTE_NAME if want == str(project / DEFAULT_REMOTE_DIR) else TEAM_REMOTE
        _set_default_remote(project, name, want)
        done.append(f"default DVC remote '{name}' -> {redact(want)}")
    if "://" not in want:
        Path(want).mkdir(parents=True, exist_ok=True)
    return done


def _init(project: Path, flags: list[str]) -> None:
    """``dvc init [--subdir|--no-scm]`` and ``dvc config core.analytics false``,
    in this process (DVC's start costs about a second per command)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    log = logging.getLogger("dvc")
    level = log.level
    log.setLevel(logging.WARNING)  # as `dvc init -q`
    try:
        Repo.init(str(project), no_scm="--no-scm" in flags, subdir="--subdir" in flags).close()
        with _config(project).edit("repo") as conf:
            conf["core"]["analytics"] = False
    except DvcException as e:
        raise StageError(f"`dvc init {' '.join(flags)}` failed in {project}: {e}") from e
    finally:
        log.setLevel(level)


def _set_default_remote(project: Path, name: str, url: str) -> None:
    """``dvc remote add --local -d -f NAME URL``."""
    from dvc.exceptions import DvcException

    try:
        with _config(project).edit("local") as conf:
            conf["remote"][name] = {"url": url}
            conf["core"]["remote"] = name
    except DvcException as e:
        problem = f"cannot set DVC remote '{name}' to {url} in {project}: {e}"
        raise StageError(redact(problem)) from e


def _remove_empty_tree(folder: Path) -> None:
    """Remove ``folder`` if it holds no file at any depth."""
    dirs = [Path(d) for d, _, files in os.walk(folder) if not files]
    if len(dirs) == sum(1 for _ in os.walk(folder)):
        for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
            d.rmdir()


def pull(project: Path) -> None:
    """``dvc pull`` the outputs recorded in dvc.lock that the remote has; what it
    lacks is left for the stages to build (``--allow-missing``). Folders DVC
    made for outputs it could not fetch are removed again (no empty leftovers)."""
    project = Path(project).resolve()
    before = set(project.iterdir())
    dvc(project, "pull", "--allow-missing", "-q")
    for new in set(project.iterdir()) - before:
        if new.is_dir() and not new.is_symlink():
            _remove_empty_tree(new)


def _command(argv: list[str]) -> list[str]:
    """``dvc ARGV`` with this interpreter (the stage commands find the same packages)."""
    return [sys.executable, "-m", "dvc", *argv]


def _stream(
    argv: list[str],
    project: Path,
    environ: dict[str, str],
    timeout: float | None,
    on_line: Callable[[str], None] | None,
) -> tuple[int, str]:
    """Run ``dvc ARGV`` with its output passed through to ours; returns its exit code
    and its output's tail. Forked by the running DVC launcher
    (:mod:`rcnnops.dvc_launcher`) when there is one and no timeout, else a
    ``python -m dvc`` process."""
    cwd = Path(project).resolve()
    forked = None if timeout is not None else dvc_launcher.spawn(argv, cwd, environ)
    with contextlib.ExitStack() as running:
        if forked is not None:
            p = forked
            running.enter_context(p.stdout)
        else:  # on leaving: its pipe closed, the process waited for
            p = running.enter_context(
                subprocess.Popen(
                    _command(argv),
                    cwd=cwd,
                    env=environ,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
            )
        assert p.stdout is not None
        tail, line = bytearray(), bytearray()
        sink = getattr(sys.stdout, "buffer", None)
        while chunk := p.stdout.read1(4096):
            if sink is not None:
                sink.write(chunk)
            else:
                sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
            tail = (tail + chunk)[-16384:]
            if on_line is not None:
                *done, rest = (line + chunk).split(b"\n")
                for ln in done:
                    on_line(ln.decode(errors="replace").rstrip("\r"))
                line = bytearray(rest[-16384:])  # progress bars: no newline for long
        code = forked.wait() if forked is not None else p.wait(timeout=timeout)
    return code, tail.decode(errors="replace").replace("\r", "\n")


def is_stale(project: Path, stage: str) -> bool:
    """Whether ``dvc repro`` would run ``stage`` (changed deps, params or outs)."""
    proc = dvc(project, "status", "--json", stage, capture=True)
    return bool(json.loads(proc.stdout or "{}"))


_RAN = re.compile(r"^Running stage '(.+)':$")


def repro(
    project: Path,
    stages: str | Sequence[str],
    force: bool = False,
    extra_env: dict[str, str] | None = None,
) -> list[str]:
    """``dvc repro --single-item STAGE...``: one DVC process runs the stages in the
    order given (the flow orders stages itself), each only if it is stale.

    Returns the stages that ran (DVC's "Running stage" lines), in order; the
    others DVC found up to date. One process for several stages saves DVC's start
    and its look at the project (a second or two each)."""
    stages = [stages] if isinstance(stages, str) else list(stages)
    ran: list[str] = []

    def seen(line: str) -> None:
        if (m := _RAN.match(line)) and m.group(1) in stages:
            ran.append(m.group(1))

    args = ("repro", "--single-item", *stages, *(["--force"] * force))
    dvc(project, *args, extra_env=extra_env, on_line=seen)
    return ran


def status(project: Path) -> dict:
    """``dvc status --json``: stale stages and why; in this process, through the
    same ``Repo.status`` the command calls under the repo's lock (the command's
    start costs about half a second)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo, lock_repo

    try:
        # _wait_for_lock: what `dvc --wait-for-lock` sets (queue behind a running
        # `dvc repro` instead of failing at once)
        with Repo(str(Path(project).resolve()), _wait_for_lock=True) as repo, lock_repo(repo):
            return repo.status()
    except DvcException as e:
        raise StageError(redact(f"`dvc status` failed in {project}: {e}")) from e
