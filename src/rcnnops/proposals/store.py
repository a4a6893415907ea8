"""The proposals store the variants read: ``<split>/boxes.npy``, ``scores.npy`` and
``index.json`` (layout in :mod:`rcnnops.proposals.precompute`), opened and checked.

Training, evaluation and registration read proposals through :func:`open_store`;
only the ``proposals`` stage (:mod:`.precompute`) writes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rcnnops.data.io import DataError
from rcnnops.files import sha256_file

if TYPE_CHECKING:  # loaded by the readers that make tensors (registration reads settings only)
    import torch

REBUILD = "rebuild them with `dvc repro proposals` (or `rcnnops proposals`)"


class ProposalError(DataError):
    """Proposal files missing, stale or corrupt (the message says how to rebuild)."""


@dataclass(frozen=True)
class SearchSettings:
    mode: str = "fast"
    max_boxes: int = 2000
    min_size: int = 8
    dedup_iou: float = 0.95
    max_side: int | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class ProposalStore:
    """Cached proposals of one split; ``store[image_id] -> (boxes, scores)`` tensors."""

    def __init__(
        self,
        folder: Path,
        settings: SearchSettings | None = None,
        data_hash: str | None = None,
        verify: bool = True,
    ) -> None:
        self.folder = Path(folder)
        index_path = self.folder / "index.json"
        if not index_path.is_file():
            raise ProposalError(f"{index_path}: proposals not found; {REBUILD}")
        try:
            self.index = json.loads(index_path.read_bytes())
        except (ValueError, RecursionError) as e:  # also bad UTF-8
            raise ProposalError(f"{index_path}: corrupt ({e}); {REBUILD}") from None
        if not isinstance(self.index, dict) or not all(
            isinstance(self.index.get(k), dict) for k in ("images", "checksums")
        ):
            raise ProposalError(f"{index_path}: corrupt (not a proposals index); {REBUILD}")
        if settings is not None and self.index.get("params") != settings.as_dict():
            raise ProposalError(
                f"{index_path}: stale: made with {self.index.get('params')}, "
                f"params now ask for {settings.as_dict()}; {REBUILD}"
            )
        if data_hash is not None and self.index.get("data_hash") != data_hash:
            raise ProposalError(
                f"{index_path}: stale: made for other data (data hash "
                f"{str(self.index.get('data_hash'))[:12]}, now {data_hash[:12]}); {REBUILD}"
            )
        for name in ("boxes.npy", "scores.npy"):
            path = self.folder / name
            if not path.is_file():
                raise ProposalError(f"{path}: missing; {REBUILD}")
            if verify and sha256_file(path) != self.index["checksums"].get(name):
                raise ProposalError(f"{path}: checksum mismatch (corrupt?); {REBUILD}")
        try:
            self.boxes = np.load(self.folder / "boxes.npy", mmap_mode="r")
            self.scores = np.load(self.folder / "scores.npy", mmap_mode="r")
        except (ValueError, OSError, EOFError) as e:  # truncated header or data
            raise ProposalError(f"{self.folder}: unreadable proposals ({e}); {REBUILD}") from None
        self._check_shapes(index_path)

    def _check_shapes(self, index_path: Path) -> None:
        """Arrays ``[total, 4]`` and ``[total]``, and every image's rows within them."""
        total = len(self.boxes)
        if self.boxes.shape != (total, 4) or self.scores.shape != (total,):
            raise ProposalError(
                f"{self.folder}: boxes {self.boxes.shape} and scores {self.scores.shape} do "
                f"not fit together (corrupt?); {REBUILD}"
            )
        for key, span in self.index["images"].items():
            if not (
                isinstance(span, list)
                and len(span) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in span)
                and 0 <= span[0] <= span[1] <= total
            ):
                raise ProposalError(
                    f"{index_path}: image id {key}: rows {span!r} are not within the "
                    f"{total} stored proposals (corrupt?); {REBUILD}"
                )

    def __contains__(self, image_id: int) -> bool:
        return str(int(image_id)) in self.index["images"]

    def __getitem__(self, image_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        span = self.index["images"].get(str(int(image_id)))
        if span is None:
            raise ProposalError(
                f"{self.folder / 'index.json'}: no proposals for image id {image_id}; {REBUILD}"
            )
        a, b = span
        import torch

        return (
            torch.from_numpy(np.array(self.boxes[a:b], dtype=np.float32)),
            torch.from_numpy(np.array(self.scores[a:b], dtype=np.float32)),
        )

    def boxes_for(self, image_id: int) -> torch.Tensor:
        """``Tensor[N, 4]`` xyxy, for ``DetectionDataset(proposals=...)``."""
        return self[image_id][0]

    @property
    def empty_images(self) -> list[int]:
        return list(self.index.get("empty", []))


def settings_from(params) -> SearchSettings:
    p = params.proposals
    return SearchSettings(p.mode, p.max_boxes, p.min_size, p.dedup_iou, p.max_side)


def open_store(params, split: str) -> ProposalStore:
    """The split's proposals, checked against params and the prepared data."""
    from rcnnops.data.prepare import load_manifest

    manifest = load_manifest(Path(params.prepare.out))
    return ProposalStore(
        Path(params.proposals.out) / split, settings_from(params), manifest["splits"][split]["hash"]
    )
