"""[stage] proposals: selective search over every prepared image, cached per split.

Layout (``proposals.out``, default ``data/proposals/``), per split:

- ``<split>/boxes.npy`` ``float32 [total, 4]`` xyxy pixels of the stored image,
  ``<split>/scores.npy`` ``float32 [total]``: all images' proposals back to back;
- ``<split>/index.json``: the params that made them, the data hash of the
  split, each image id's ``[start, end)`` rows, image ids with no proposal,
  and checksums of the two arrays.

:class:`ProposalStore` memory-maps the arrays, so one image's proposals load in
well under a millisecond, and refuses files that are missing, stale (other
params or data) or corrupt, saying how to rebuild them.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from rcnnops.data.io import DataError, load_image_array, safe_image_path
from rcnnops.files import replaced_dir, sha256_file
from rcnnops.proposals.selective_search import selective_search

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


def _one(args: tuple[str, SearchSettings]) -> tuple[np.ndarray, np.ndarray]:
    path, s = args
    import cv2

    cv2.setNumThreads(1)  # the pool gives the parallelism
    image = load_image_array(Path(path))
    return selective_search(
        image, s.mode, s.max_boxes, s.min_size, s.dedup_iou, max_side=s.max_side
    )


def search_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool for :func:`compute_split`. spawn, not fork: a process whose
    OpenMP pool (torch) has started can deadlock its forked children."""
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))


def compute_split(
    coco: dict,
    image_root: Path,
    settings: SearchSettings,
    workers: int,
    desc: str = "",
    pool: ProcessPoolExecutor | None = None,
) -> tuple[list[int], list[np.ndarray], list[np.ndarray]]:
    """Selective search on every image of a COCO split, in id order, in a process
    pool (``pool``, or one of ``workers`` processes made for the call)."""
    images = sorted(coco["images"], key=lambda im: im["id"])
    paths = [
        str(safe_image_path(image_root, im["file_name"], f"image id {im['id']}")) for im in images
    ]
    jobs = [(p, settings) for p in paths]
    if pool is None and workers <= 1:
        results = [_one(j) for j in tqdm(jobs, desc=desc, unit="img", leave=False)]
    elif pool is None:
        with search_pool(workers) as own:
            return compute_split(coco, image_root, settings, workers, desc, own)
    else:
        mapped = pool.map(_one, jobs)  # one image per task: the bar moves per image
        results = list(tqdm(mapped, total=len(jobs), desc=desc, unit="img", leave=False))
    return [im["id"] for im in images], [r[0] for r in results], [r[1] for r in results]


def write_split(
    folder: Path,
    ids: list[int],
    boxes: list[np.ndarray],
    scores: list[np.ndarray],
    settings: SearchSettings,
    data_hash: str,
) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    offsets = np.cumsum([0] + [len(b) for b in boxes])
    all_boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32)
    all_scores = np.concatenate(scores) if scores else np.zeros((0,), np.float32)
    np.save(folder / "boxes.npy", all_boxes.astype(np.float32).reshape(-1, 4))
    np.save(folder / "scores.npy", all_scores.astype(np.float32))
    index = {
        "params": settings.as_dict(),
        "data_hash": data_hash,
        "images": {str(i): [int(offsets[k]), int(offsets[k + 1])] for k, i in enumerate(ids)},
        "empty": [i for i, b in zip(ids, boxes, strict=True) if len(b) == 0],
        "checksums": {n: sha256_file(folder / n) for n in ("boxes.npy", "scores.npy")},
    }
    (folder / "index.json").write_text(json.dumps(index))
    return index


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


def precompute(prepared: Path, out: Path, settings: SearchSettings, workers: int) -> dict:
    """Both splits of ``prepared`` into ``out`` (written atomically). Returns counts."""
    from rcnnops.data.prepare import load_manifest, load_split

    manifest = load_manifest(prepared)
    summary, pool = {}, None
    try:
        with replaced_dir(Path(out), ".proposals-") as tmp:
            pool = search_pool(workers) if workers > 1 else None
            for split in ("train", "val"):
                coco, root, _ = load_split(prepared, split)
                ids, boxes, scores = compute_split(
                    coco, root, settings, workers, f"proposals {split}", pool
                )
                index = write_split(
                    tmp / split, ids, boxes, scores, settings, manifest["splits"][split]["hash"]
                )
                n = [len(b) for b in boxes]
                summary[split] = {
                    "images": len(ids),
                    "mean_boxes": float(np.mean(n)) if n else 0.0,
                    "images_without_proposals": len(index["empty"]),
                }
    finally:
        if pool is not None:
            pool.shutdown()
    return summary


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


def run(params) -> dict:
    """The stage: proposals for both splits, then the recall report."""
    from rcnnops.data.dataset import DetectionDataset
    from rcnnops.data.prepare import load_split
    from rcnnops.proposals.recall import plot_recall, recall_report

    summary = precompute(
        Path(params.prepare.out),
        Path(params.proposals.out),
        settings_from(params),
        params.proposals.workers,
    )
    reports = {}
    for split in ("train", "val"):
        coco, root, labels = load_split(Path(params.prepare.out), split)
        store = open_store(params, split)
        ds = DetectionDataset(coco, root, labels)
        pairs = ((ds.gt_boxes(k), store.boxes_for(im["id"])) for k, im in enumerate(ds.images))
        reports[split] = recall_report(pairs) | summary[split]
        print(
            f"{split}: {summary[split]['images']} images, "
            f"{summary[split]['mean_boxes']:.0f} proposals/image, "
            f"{summary[split]['images_without_proposals']} without any; recall@0.5 "
            f"(2000) {reports[split]['recall@0.5/2000']:.3f}, @0.7 "
            f"{reports[split]['recall@0.7/2000']:.3f}"
        )
    out = Path(params.evaluate.out) / "proposals"
    out.mkdir(parents=True, exist_ok=True)
    plot_recall(reports, out / "recall.png")
    (out / "metrics.json").write_text(json.dumps(reports, indent=2))
    return reports
