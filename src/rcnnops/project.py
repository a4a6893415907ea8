"""The project folder and DVC: initialise, configure the default remote, run stages.

DVC owns files and caching; this module only drives its command line (``dvc
repro`` is not in ``dvc.api``) with the running interpreter, so the stage
commands find the same ``rcnnops`` and packages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

DEFAULT_REMOTE_NAME = "local"
DEFAULT_REMOTE_DIR = ".dvcremote"  # inside the project, git-ignored


class StageError(RuntimeError):
    """A DVC command failed; the message carries its output's tail."""


def env() -> dict[str, str]:
    """The environment for child commands: this interpreter's bin first on PATH."""
    e = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    e["PATH"] = bin_dir + os.pathsep + e.get("PATH", "")
    e.setdefault("DVC_NO_ANALYTICS", "1")
    return e


def dvc(
    project: Path,
    *args: str,
    check: bool = True,
    capture: bool = False,
    timeout: float | None = None,
) -> subprocess.CompletedProcess:
    """Run ``dvc ARGS`` in ``project`` with this interpreter.

    Without ``capture`` the output streams through (progress stays visible) and
    its last lines go into the :class:`StageError` raised on failure.
    """
    cmd = [sys.executable, "-m", "dvc", *args]
    if capture:
        proc = subprocess.run(
            cmd, cwd=project, env=env(), text=True, timeout=timeout, capture_output=True
        )
        out = (proc.stdout or "") + (proc.stderr or "")
    else:
        # Stream raw bytes so progress bars (carriage returns) stay live; keep a tail.
        tail = bytearray()
        with subprocess.Popen(
            cmd, cwd=project, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        ) as p:
            assert p.stdout is not None
            sink = getattr(sys.stdout, "buffer", None)
            while chunk := p.stdout.read1(4096):
                if sink is not None:
                    sink.write(chunk)
                else:
                    sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
                tail = (tail + chunk)[-16384:]
            code = p.wait(timeout=timeout)
        out = tail.decode(errors="replace").replace("\r", "\n")
        proc = subprocess.CompletedProcess(cmd, code, out, "")
    if check and proc.returncode != 0:
        errors = [ln for ln in out.splitlines() if "error" in ln.lower()]
        detail = "\n".join(errors[-5:] or out.strip().splitlines()[-15:])
        raise StageError(
            f"`dvc {' '.join(args)}` failed in {project} "
            f"(exit {proc.returncode})" + (f":\n{detail}" if detail else "")
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
    return Path(out.stdout.strip()).resolve() if out.returncode == 0 else None


def ensure_dvc(project: Path) -> list[str]:
    """Initialise DVC in ``project`` if needed and make sure a default remote
    exists (a local folder unless one is configured). Returns what it did."""
    project = Path(project).resolve()
    done = []
    if not (project / ".dvc").is_dir():
        top = _git_toplevel(project)
        flags = [] if top == project else (["--subdir"] if top else ["--no-scm"])
        dvc(project, "init", "-q", *flags)
        dvc(project, "config", "core.analytics", "false")
        done.append("initialised DVC" + (f" ({' '.join(flags)})" if flags else ""))
    remote = dvc(project, "remote", "default", check=False, capture=True)
    if remote.returncode != 0 or not remote.stdout.strip():
        dvc(
            project, "remote", "add", "-d", "-f", DEFAULT_REMOTE_NAME, DEFAULT_REMOTE_DIR
        )  # relative to the cwd; DVC stores it relative to .dvc/
        done.append(
            f"configured default DVC remote '{DEFAULT_REMOTE_NAME}' -> "
            f"{project / DEFAULT_REMOTE_DIR}"
        )
    (project / DEFAULT_REMOTE_DIR).mkdir(exist_ok=True)
    return done


def is_stale(project: Path, stage: str) -> bool:
    """Whether ``dvc repro`` would run ``stage`` (changed deps, params or outs)."""
    proc = dvc(project, "status", "--json", stage, capture=True)
    return bool(json.loads(proc.stdout or "{}"))


def repro(project: Path, stage: str, force: bool = False) -> bool:
    """``dvc repro --single-item STAGE`` (the flow orders stages itself).

    Returns True when the stage ran, False when DVC found it up to date."""
    stale = force or is_stale(project, stage)
    if stale:
        dvc(project, "repro", "--single-item", stage, *(["--force"] if force else []))
    return stale


def status(project: Path) -> dict:
    """``dvc status --json``: stale stages and why."""
    proc = dvc(project, "status", "--json", capture=True)
    return json.loads(proc.stdout or "{}")
