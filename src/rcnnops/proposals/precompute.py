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

Each image's boxes also go to the per-image cache (``<proposals.out>-cache``,
:mod:`rcnnops.proposals.cache`), so a rerun searches only new or changed images
and rebuilds the same store byte for byte. Searching runs in a local process
pool or on a Dask cluster (``proposals.cluster``, :mod:`.executors`).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rcnnops.data.io import safe_image_path
from rcnnops.data.pixels import pillow_limit
from rcnnops.files import replaced_dir, sha256_file
from rcnnops.proposals import executors
from rcnnops.proposals.cache import ProposalCache, prune
from rcnnops.proposals.store import (  # noqa: F401  (re-exported: the store's readers)
    REBUILD,
    ProposalError,
    ProposalStore,
    SearchSettings,
    open_store,
    settings_from,
)


def search_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool for :func:`compute_split`. spawn, not fork: a process whose
    OpenMP pool (torch) has started can deadlock its forked children. The workers
    take this process's Pillow limit (:mod:`rcnnops.data.pixels`) and end with it
    (:func:`~rcnnops.proposals.executors.start_worker`)."""
    return ProcessPoolExecutor(
        workers,
        mp_context=mp.get_context("spawn"),
        initializer=executors.start_worker,
        initargs=(pillow_limit(), os.getpid()),
    )


@dataclass
class SplitProposals:
    """One split's proposals in image-id order, and where they came from."""

    ids: list[int]
    boxes: list[np.ndarray]
    scores: list[np.ndarray]
    searched: int  # images selective search ran on (the rest came from the cache)
    cached: int


def search_split(
    coco: dict,
    image_root: Path,
    settings: SearchSettings,
    workers: int,
    desc: str = "",
    pool: ProcessPoolExecutor | None = None,
    cache: ProposalCache | None = None,
    cluster: str | None = None,
) -> SplitProposals:
    """Selective search on every image of a COCO split, in id order: images in
    ``cache`` (by content hash) are read from it, the others are searched in a
    process pool (``pool``, or one of ``workers`` processes made for the call) or
    on the Dask cluster at ``cluster``, and added to the cache as they finish."""
    images = sorted(coco["images"], key=lambda im: im["id"])
    paths = [
        str(safe_image_path(image_root, im["file_name"], f"image id {im['id']}")) for im in images
    ]
    digests = [sha256_file(Path(p)) for p in paths] if cache is not None else []
    results = [cache.get(d) for d in digests] if cache is not None else [None] * len(paths)
    todo = [k for k, r in enumerate(results) if r is None]
    with ExitStack() as stack:
        jobs = [paths[k] for k in todo]
        if todo and cluster:
            done = executors.run_dask(cluster, jobs, settings, desc)
        elif workers <= 1 or len(todo) <= 2 * workers:  # a few: no worker start-up
            done = executors.run_local(jobs, settings, None, desc)
        else:
            pool = pool or stack.enter_context(search_pool(workers))
            done = executors.run_local(jobs, settings, pool, desc)
        for j, result in done:
            k = todo[j]
            results[k] = result
            if cache is not None:
                cache.put(digests[k], *result)
    return SplitProposals(
        [im["id"] for im in images],
        [r[0] for r in results],
        [r[1] for r in results],
        searched=len(todo),
        cached=len(paths) - len(todo),
    )


def compute_split(
    coco: dict,
    image_root: Path,
    settings: SearchSettings,
    workers: int,
    desc: str = "",
    pool: ProcessPoolExecutor | None = None,
) -> tuple[list[int], list[np.ndarray], list[np.ndarray]]:
    """:func:`search_split` without a cache: ``(ids, boxes, scores)``."""
    got = search_split(coco, image_root, settings, workers, desc, pool)
    return got.ids, got.boxes, got.scores


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


def precompute(
    prepared: Path,
    out: Path,
    settings: SearchSettings,
    workers: int,
    cache_dir: Path | None = None,
    cluster: str | None = None,
    cache_keep: int | None = None,
) -> dict:
    """Both splits of ``prepared`` into ``out`` (written atomically), reusing and
    filling the per-image cache in ``cache_dir`` (see :mod:`.cache`), then keeping
    there only the ``cache_keep`` most recently used settings (None: all); searches
    on the Dask cluster at ``cluster`` when given. Returns counts."""
    from rcnnops.data.prepare import load_manifest, load_split

    manifest = load_manifest(prepared)
    cache = ProposalCache(cache_dir, settings.as_dict()) if cache_dir is not None else None
    if cache is not None:
        cache.mark_used()
    summary = {}
    # One pool for both splits (its processes start on first use only).
    pool = search_pool(workers) if workers > 1 and not cluster else None
    try:
        with replaced_dir(Path(out), ".proposals-") as tmp:
            for split in ("train", "val"):
                coco, root, _ = load_split(prepared, split)
                got = search_split(
                    coco, root, settings, workers, f"proposals {split}", pool, cache, cluster
                )
                index = write_split(
                    tmp / split,
                    got.ids,
                    got.boxes,
                    got.scores,
                    settings,
                    manifest["splits"][split]["hash"],
                )
                n = [len(b) for b in got.boxes]
                summary[split] = {
                    "images": len(got.ids),
                    "searched": got.searched,
                    "from_cache": got.cached,
                    "mean_boxes": float(np.mean(n)) if n else 0.0,
                    "images_without_proposals": len(index["empty"]),
                }
    finally:
        if pool is not None:  # on Ctrl-C or an error, images not started are not searched
            pool.shutdown(cancel_futures=True)
    if cache is not None and cache.unreadable:
        print(f"proposal cache: {cache.unreadable} damaged entries searched again and replaced")
    if cache is not None and cache_keep is not None:
        pruned = prune(cache, cache_keep)
        if pruned.keys:
            print(f"proposal cache: {pruned} beyond proposals.cache_keep={cache_keep}")
    return summary


def cache_dir(params) -> Path:
    """The per-image cache beside the store: ``<proposals.out>-cache`` (dvc.yaml's output)."""
    return Path(str(params.proposals.out).rstrip("/") + "-cache")


def run(params) -> dict:
    """The stage: proposals for both splits, then the recall report."""
    from rcnnops.data.dataset import DetectionDataset
    from rcnnops.data.prepare import load_split
    from rcnnops.proposals.recall import TOP_K, plot_recall, recall_report

    p = params.proposals
    cluster = executors.cluster_address(p.cluster)
    summary = precompute(
        Path(params.prepare.out),
        Path(p.out),
        settings_from(params),
        p.workers,
        cache_dir(params),
        cluster,
        p.cache_keep,
    )
    reports = {}
    # the summary's recall: at the boxes kept per image (max_boxes), up to TOP_K's last
    kept = min(params.proposals.max_boxes, TOP_K[-1])
    top_k = tuple(sorted(set(TOP_K) | {kept}))
    for split in ("train", "val"):
        coco, root, labels = load_split(Path(params.prepare.out), split)
        store = open_store(params, split)
        ds = DetectionDataset(coco, root, labels)
        pairs = ((ds.gt_boxes(k), store.boxes_for(im["id"])) for k, im in enumerate(ds.images))
        reports[split] = recall_report(pairs, top_k) | summary[split]
        print(
            f"{split}: {summary[split]['images']} images ({summary[split]['searched']} searched"
            f"{' on ' + cluster if cluster else ''}, {summary[split]['from_cache']} from the "
            f"cache), "
            f"{summary[split]['mean_boxes']:.0f} proposals/image, "
            f"{summary[split]['images_without_proposals']} without any; recall@0.5 "
            f"(top {kept}) {reports[split][f'recall@0.5/{kept}']:.3f}, @0.7 "
            f"{reports[split][f'recall@0.7/{kept}']:.3f}"
        )
    out = Path(params.evaluate.out) / "proposals"
    out.mkdir(parents=True, exist_ok=True)
    plot_recall(reports, out / "recall.png")
    (out / "metrics.json").write_text(json.dumps(reports, indent=2))
    return reports
