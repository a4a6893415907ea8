"""One pipeline run at a time per project: an exclusive ``flock`` on ``PROJECT/.rcnnops.lock``.

Two runs at once on one project would race on ``params.yaml``, DVC's outputs and
cache and the registry. ``rcnnops run`` and the ``retrain`` flow take this lock
without waiting: a second run refuses at once, naming the holder (pid, host,
start time, written into the file). The kernel drops a ``flock`` when its
process ends, however it ends, so a killed run never leaves a stale lock (the
file stays; its content is only a note). Re-entrant within one process: the CLI
takes it, then the flow it calls takes it again. Inherited by child processes:
the holder puts ``RCNNOPS_PROJECT_LOCK=<lock file>:<pid>`` in its environment, so
the stage commands its ``dvc repro`` runs (``rcnnops train`` ...) go ahead under
its lock, while the same commands typed in another shell refuse.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from rcnnops.errors import UserError

LOCK_NAME = ".rcnnops.lock"
ENV = "RCNNOPS_PROJECT_LOCK"  # "<lock file>:<holder pid>", for the holder's children

_held: dict[Path, tuple[int, int]] = {}  # lock path -> (pid, depth) in this process
_guard = threading.Lock()


class LockedError(UserError, RuntimeError):
    """Another rcnnops run holds the project's lock (the message names it)."""


def lock_file(project: Path) -> Path:
    return Path(project).resolve() / LOCK_NAME


def holder(path: Path) -> dict:
    """What the lock file says about its holder (``{}`` if unreadable or empty)."""
    try:
        info = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _refusal(path: Path) -> LockedError:
    info = holder(path)
    for _ in range(20):  # the holder writes its note just after taking the lock
        if info:
            break
        time.sleep(0.05)
        info = holder(path)
    who = (
        f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}"
        if info
        else "holder unknown"
    )
    return LockedError(
        f"another rcnnops run ({who}) holds {path}; wait for it to finish or stop it "
        "(the lock is released when that process exits; the file itself can stay)"
    )


@contextmanager
def flocked(
    path: Path,
    wait: float | None = None,
    refusal: Callable[[], Exception] | None = None,
    waiting: Callable[[], None] | None = None,
) -> Iterator[int]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block;
    yields its fd. ``wait`` None blocks until it is free (calling ``waiting()``
    first when it is not); otherwise after ``wait`` seconds ``refusal()`` is
    raised. ``flock`` excludes other processes and other threads that open the
    file too, and dies with its process."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if wait is None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if waiting is not None:
                    waiting()
                fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            _poll(
                fd, time.monotonic() + wait, refusal or (lambda: LockedError(f"{path} is locked"))
            )
        try:
            yield fd
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _poll(fd: int, deadline: float, refusal: Callable[[], Exception]) -> None:
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise refusal() from None
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def _inherited(path: Path) -> bool:
    """Whether an ancestor holds ``path``: the environment names it and its holder,
    that holder is alive and the lock file's note names it too."""
    where, _, pid = os.environ.get(ENV, "").rpartition(":")
    if where != str(path) or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return holder(path).get("pid") == int(pid)


@contextmanager
def project_lock(project: Path, wait: float = 0.0) -> Iterator[Path]:
    """Hold ``project``'s run lock for the ``with`` block; yields the lock file.

    ``wait`` seconds to wait for another holder (0: refuse at once) before
    raising :class:`LockedError`.
    """
    path = lock_file(project)
    pid = os.getpid()
    with _guard:
        owner, depth = _held.get(path, (0, 0))
        nested = owner == pid  # already ours (the CLI, then the flow it runs)
        if nested:
            _held[path] = (pid, depth + 1)
    if nested:
        try:
            yield path
        finally:
            with _guard:
                _held[path] = (pid, _held[path][1] - 1)
        return
    if _inherited(path):  # a stage command run by the holder's `dvc repro`
        yield path
        return
    with flocked(path, wait, lambda: _refusal(path)) as fd:
        note = {
            "pid": pid,
            "host": socket.gethostname(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(note).encode(), 0)
        with _guard:
            _held[path] = (pid, 1)
        before = os.environ.get(ENV)
        os.environ[ENV] = f"{path}:{pid}"
        try:
            yield path
        finally:
            if before is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = before
            with _guard:
                _held.pop(path, None)
            os.ftruncate(fd, 0)
