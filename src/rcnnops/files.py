"""Writing files so that a kill or an error never leaves half an output, and hashing them.

Every stage output goes through these: a reader (DVC, the next stage, a served
model) sees either the old file or folder or the complete new one.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced_dir(out: Path, prefix: str = ".tmp-") -> Iterator[Path]:
    """A fresh temporary sibling of ``out`` to fill; swapped in as ``out`` when
    the block succeeds, removed (``out`` untouched) when it raises.

    The swap moves the old ``out`` aside before the new one takes its name, so a
    kill at any moment leaves the old folder, the new one, or (between the two
    renames) none, never half of one. Siblings a killed process left (named
    ``<prefix><pid>-...`` by a process no longer running, or by an rcnnops before
    2026-12-04 without a pid) are removed first. The new folder gets the
    permissions of any folder made under the process's umask (a temporary folder
    is private to its owner)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_left_behind(out.parent, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=out.parent))
    old = tmp.with_name(tmp.name + ".old")
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        moved = out.exists()
        if moved:
            os.rename(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if moved:  # put the old folder back
                os.rename(old, out)
            raise
    finally:
        for left in (tmp, old):
            if left.exists():
                shutil.rmtree(left)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_left_behind(parent: Path, prefix: str) -> None:
    for sibling in parent.glob(f"{prefix}*"):
        pid = sibling.name[len(prefix) :].split("-", 1)[0]
        if sibling.is_dir() and not sibling.is_symlink() and not _running(pid):
            shutil.rmtree(sibling, ignore_errors=True)


def _running(pid: str) -> bool:
    """Whether ``pid`` (text from a folder's name) is a running process here."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and
    ``os.replace``: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_figure(fig, path: Path, dpi: int | None = 100) -> Path:
    """A matplotlib figure as a PNG at ``path``, whole: drawn in memory, then
    :func:`write_atomic` (a kill while saving left a 0-byte picture in place of
    the previous one)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return write_atomic(path, buf.getvalue())


def sha256_bytes(data: str | bytes) -> str:
    """Hex sha256 of ``data`` (text is hashed as UTF-8)."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
