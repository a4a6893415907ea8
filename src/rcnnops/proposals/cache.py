"""Selective search results per image, keyed by the image's bytes and the settings.

Layout (``<proposals.out>-cache``, by default ``data/proposals-cache/``)::

    <settings key>/settings.json        what the key stands for
    <settings key>/<ab>/<sha256>.npz    boxes float32 [N, 4], scores float32 [N]

The settings key hashes the :class:`SearchSettings`, OpenCV's version (its
segmentation decides the boxes) and :data:`VERSION`; the file name is the sha256
of the image file's bytes. So a rerun after adding, removing or changing images
searches only the images it has not seen with these settings, and the store built
from the cache is byte-identical to a from-scratch one. The folder is a persisted
DVC output of the ``proposals`` stage: ``dvc push`` / ``pull`` carry it, so a
teammate's clone reuses it. Entries are written atomically (a killed run keeps
what it finished); an unreadable entry is searched again and counted, never used.

The folder keeps the settings the stage used last: :func:`prune` removes the keys
beyond the ``proposals.cache_keep`` most recently used ones (by the time each was
last used in this clone), so trying other settings does not grow the folder, or
what a teammate's ``dvc pull`` fetches, without end (DVC's cache and remote keep
the removed files until ``dvc gc``). Entries of images no longer in the data stay
in a kept key (about 40 kB each; a data version checked out again reuses them).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rcnnops.files import write_atomic

VERSION = 2  # bump when selective_search's output changes for the same settings
# (2: regions ranked largest first, as the paper does; 1 ranked the smallest first)


def settings_key(settings: dict) -> str:
    """16 hex digits naming the settings (+ OpenCV version and :data:`VERSION`)."""
    import cv2

    blob = json.dumps(
        {"settings": settings, "opencv": cv2.__version__, "cache_version": VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ProposalCache:
    """``cache.get(digest)`` / ``cache.put(digest, boxes, scores)`` for one settings key."""

    def __init__(self, root: Path, settings: dict) -> None:
        self.key = settings_key(settings)
        self.dir = Path(root) / self.key
        self.settings = settings
        self.unreadable = 0  # entries found damaged (searched again)

    def _path(self, digest: str) -> Path:
        return self.dir / digest[:2] / f"{digest}.npz"

    def get(self, digest: str) -> tuple[np.ndarray, np.ndarray] | None:
        path = self._path(digest)
        if not path.is_file():
            return None
        try:
            with np.load(path) as z:
                boxes, scores = z["boxes"], z["scores"]
        except Exception:  # truncated or foreign file: search the image again
            self.unreadable += 1
            return None
        if boxes.ndim != 2 or boxes.shape[1:] != (4,) or scores.shape != (len(boxes),):
            self.unreadable += 1
            return None
        return boxes, scores

    def mark_used(self) -> None:
        """Record that the stage uses this key now (the time :func:`prune` orders by)."""
        info = self.dir / "settings.json"
        if info.is_file():
            with contextlib.suppress(OSError):  # a DVC-linked file another user owns
                os.utime(info)  # (only the pruning order misses this use)
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_atomic(info, json.dumps(self.settings, indent=2))

    def put(self, digest: str, boxes: np.ndarray, scores: np.ndarray) -> None:
        path = self._path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "settings.json").is_file():
            self.mark_used()
        buf = io.BytesIO()
        np.savez(buf, boxes=np.asarray(boxes, np.float32), scores=np.asarray(scores, np.float32))
        write_atomic(path, buf.getvalue())


@dataclass
class Pruned:
    """What :func:`prune` removed."""

    keys: int = 0
    entries: int = 0
    bytes: int = 0

    def __str__(self) -> str:
        return (
            f"removed {self.keys} older settings' entries ({self.entries} images, "
            f"{self.bytes / 1e6:.1f} MB)"
        )


def prune(cache: ProposalCache, keep: int) -> Pruned:
    """Remove the settings keys beside ``cache``'s beyond the ``keep`` most recently
    used (``cache``'s, the one in use, always stays; the others by when they were
    last used in this clone: their ``settings.json``'s time). Folders that are not
    settings keys are left alone; what a prune killed midway left is removed."""
    root, current = cache.dir.parent, cache.key
    if not root.is_dir():
        return Pruned()
    for left in root.glob(".pruned-*"):  # hidden before removal: see below
        shutil.rmtree(left)
    keys = [
        d for d in root.iterdir()
        if d.is_dir() and not d.name.startswith(".") and (d / "settings.json").is_file()
    ]  # fmt: skip
    others = sorted(
        (d for d in keys if d.name != current),
        key=lambda d: ((d / "settings.json").stat().st_mtime, d.name),
        reverse=True,
    )
    done = Pruned()
    for d in others[max(keep - 1, 0) :]:
        entries = list(d.glob("*/*.npz"))
        done.keys += 1
        done.entries += len(entries)
        done.bytes += sum(e.stat().st_size for e in entries)
        # out of sight first: a prune killed midway leaves no half key that looks used
        gone = d.with_name(f".pruned-{d.name}")
        d.rename(gone)
        shutil.rmtree(gone)
    return done
