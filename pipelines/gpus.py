"""Which GPUs a stage trains on: one lease per GPU, held for the stage's duration.

Prefect's ``gpu`` concurrency limit says *how many* GPUs are busy; a lease says
*which*. A stage that holds ``k`` GPU slots takes ``k`` free leases and runs with
``CUDA_VISIBLE_DEVICES`` set to exactly those GPUs (a DDP stage's torchrun
workers then see them as ``cuda:0 .. cuda:k-1``), so concurrent stages never
share a GPU, also when two flows on one machine share a Prefect server.

A lease is an exclusive ``flock`` on ``<lease dir>/gpu-<id>.lock``: the kernel
drops it when its holder exits, however it exits, so a killed stage (or a
killed flow) frees its GPUs for the next stage at once; no stale lease is left
to clean up. The file holds a note (pid, stage, time) naming the holder for
messages. The lease folder is per machine: ``RCNNOPS_GPU_LEASES`` or
``<tmp>/rcnnops-gpu-leases`` (shared by every user, mode 1777).

GPU ids are the entries of the flow's own ``CUDA_VISIBLE_DEVICES`` when set
(``"2,3"``, or UUIDs), else ``0 .. N-1`` from ``nvidia-smi -L``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

from rcnnops.errors import UserError

LEASES_ENV = "RCNNOPS_GPU_LEASES"


class LeaseTimeout(UserError, TimeoutError):
    """No ``k`` GPUs became free in time (the message names their holders)."""


def visible_gpu_ids(environ: dict[str, str] | None = None) -> list[str]:
    """The GPUs this process may use, without importing torch: the entries of
    ``CUDA_VISIBLE_DEVICES`` (up to the first ``-1``, as CUDA reads it), else
    one id per line of ``nvidia-smi -L``; ``[]`` on a machine without GPUs."""
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = []
        for entry in (e.strip() for e in visible.split(",")):
            if not entry or entry == "-1":
                break
            ids.append(entry)
        return ids
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [
        str(i) for i, _ in enumerate(line for line in out.stdout.splitlines() if line[:4] == "GPU ")
    ]


def lease_dir() -> Path:
    """The machine's lease folder (created world-writable, sticky, on first use)."""
    path = Path(os.environ.get(LEASES_ENV) or Path(tempfile.gettempdir()) / "rcnnops-gpu-leases")
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            path.chmod(0o1777)  # every user's flows lease from the same GPUs
    return path


def _lease_file(folder: Path, gpu: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in gpu)
    return folder / f"gpu-{safe}.lock"


def _try(path: Path, note: dict) -> int | None:
    """The fd holding ``path``'s flock, or None when another holder has it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(note).encode(), 0)
    return fd


def _release(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def holders(ids: Sequence[str], folder: Path | None = None) -> dict[str, dict]:
    """What each held GPU's lease file says about its holder (free GPUs left out)."""
    folder = folder or lease_dir()
    found = {}
    for gpu in ids:
        path = _lease_file(folder, gpu)
        if not path.is_file():
            continue
        fd = _try(path, {})
        if fd is not None:  # free
            _release(fd)
            continue
        try:
            found[gpu] = json.loads(path.read_text() or "{}")
        except (OSError, ValueError):
            found[gpu] = {}
    return found


@contextmanager
def lease(
    count: int,
    stage: str,
    ids: Sequence[str] | None = None,
    timeout: float = 3600.0,
    poll: float = 0.5,
    folder: Path | None = None,
) -> Iterator[list[str]]:
    """Hold ``count`` free GPUs of ``ids`` (default: the visible ones) for the
    block; yields their ids, for ``CUDA_VISIBLE_DEVICES``.

    Takes all ``count`` or none (no stage sits on half a DDP group), lowest ids
    first; waits up to ``timeout`` seconds for GPUs that other holders free,
    then raises :class:`LeaseTimeout` naming them."""
    ids = list(visible_gpu_ids() if ids is None else ids)
    if not 0 < count <= len(ids):
        raise LeaseTimeout(
            f"{stage}: needs {count} GPU(s) and {len(ids)} are visible "
            f"({', '.join(ids) or 'none'}); lower train.nproc"
        )
    folder = folder or lease_dir()
    note = {
        "pid": os.getpid(),
        "stage": stage,
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    deadline = time.monotonic() + timeout
    while True:
        taken: list[tuple[str, int]] = []
        for gpu in ids:
            fd = _try(_lease_file(folder, gpu), note)
            if fd is not None:
                taken.append((gpu, fd))
                if len(taken) == count:
                    break
        if len(taken) == count:
            break
        for _, fd in taken:
            _release(fd)
        if time.monotonic() >= deadline:
            busy = "; ".join(
                f"GPU {g}: pid {h.get('pid', '?')} ({h.get('stage', '?')})"
                for g, h in holders(ids, folder).items()
            )
            raise LeaseTimeout(
                f"{stage}: no {count} free GPU(s) after {timeout:.0f} s ({busy or 'none held'})"
            )
        time.sleep(poll)
    with ExitStack() as stack:
        for _, fd in taken:
            stack.callback(_release, fd)
        yield [gpu for gpu, _ in taken]
