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
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np

from rcnnops.files import write_atomic

VERSION = 1  # bump when selective_search's output changes for the same settings


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

    def put(self, digest: str, boxes: np.ndarray, scores: np.ndarray) -> None:
        path = self._path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        info = self.dir / "settings.json"
        if not info.is_file():
            write_atomic(info, json.dumps(self.settings, indent=2))
        buf = io.BytesIO()
        np.savez(buf, boxes=np.asarray(boxes, np.float32), scores=np.asarray(scores, np.float32))
        write_atomic(path, buf.getvalue())
