"""Where per-image selective search runs: this machine's process pool, or a Dask cluster.

Both yield ``(k, (boxes, scores))`` for job ``k`` as results arrive, so the caller
caches each image as soon as it is done (a killed run keeps its finished images).

The Dask path (``proposals.cluster``, else ``$DASK_SCHEDULER_ADDRESS``) sends each
image's *bytes* with its task rather than its path: workers on other machines
then need no shared file system mounted at the same path, and a COCO photo
(~160 kB) costs far less to send than the ~2 s of search it carries. Workers need
rcnnops installed (the same version: the task is :func:`search_bytes`). A task
that fails on a worker (a lost worker, an exception) is retried ``retries`` times
by Dask before the stage fails, naming the image.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from rcnnops.data.io import DataError, load_image_array
from rcnnops.data.pixels import allow_pixels, pillow_limit, set_pillow_limit

Result = tuple[np.ndarray, np.ndarray]


def start_worker(pixels: int | None, parent: int) -> None:
    """A local pool worker's start: the parent's Pillow limit, and the worker ends
    when the parent does. A SIGKILLed stage left its spawned workers alive (0.8 GB
    each, for minutes, until killed by hand): on Linux the kernel now sends them
    SIGTERM when their parent dies (``PR_SET_PDEATHSIG``; strictly, when the
    thread that started them ends: a pool is used by the code that made it, and
    workers are started by ``submit``)."""
    set_pillow_limit(pixels)
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def search_path(job: tuple[str, object]) -> Result:
    """One image by path: ``(path, SearchSettings)``."""
    path, s = job
    return _search(load_image_array(Path(path)), s)


def search_bytes(name: str, data: bytes, s, pixels: int | None = None) -> Result:
    """One image sent as bytes (a Dask task); errors name the image. ``pixels``:
    the sender's Pillow limit (:mod:`rcnnops.data.pixels`), for the worker's."""
    allow_pixels(pixels)
    try:
        image = load_image_array(io.BytesIO(data))
    except DataError as e:
        raise DataError(f"{name}: {e}") from None
    return _search(image, s)


def _search(image: np.ndarray, s) -> Result:
    import cv2

    from rcnnops.proposals.selective_search import selective_search

    cv2.setNumThreads(1)  # the pool (or the cluster) gives the parallelism
    return selective_search(
        image, s.mode, s.max_boxes, s.min_size, s.dedup_iou, max_side=s.max_side
    )


def cluster_address(configured: str | None) -> str | None:
    """``proposals.cluster``, else ``$DASK_SCHEDULER_ADDRESS``, else None (local pool)."""
    return configured or os.environ.get("DASK_SCHEDULER_ADDRESS") or None


def run_local(
    paths: Sequence[str], settings, pool: ProcessPoolExecutor | None, desc: str
) -> Iterator[tuple[int, Result]]:
    """In ``pool``, or in this process when it is None."""
    jobs = [(p, settings) for p in paths]
    # One image per task: the bar moves per image.
    done = 0
    try:
        results = map(search_path, jobs) if pool is None else pool.map(search_path, jobs)
        for i, result in enumerate(tqdm(results, total=len(jobs), desc=desc, unit="img",
                                        leave=False)):  # fmt: skip
            yield i, result
            done = i + 1
    except BrokenProcessPool:
        raise DataError(
            f"a selective-search worker process died (killed, or out of memory) after "
            f"{done} of {len(jobs)} {desc} images; lower proposals.workers or "
            "proposals.max_side and rerun (the images searched are cached)"
        ) from None


def run_dask(
    address: str, paths: Sequence[str], settings, desc: str, retries: int = 2
) -> Iterator[tuple[int, Result]]:
    from distributed import Client

    try:
        client = Client(address, timeout=30)
    except (OSError, TimeoutError) as e:
        raise DataError(
            f"proposals.cluster {address!r}: no Dask scheduler answers there ({e})"
        ) from None
    with client:
        yield from _windowed(client, paths, settings, desc, address, retries)


def _windowed(client, paths, settings, desc, address, retries, window=256):
    """Keep at most ``window`` images in flight: the bytes of a COCO-sized set
    never sit in memory at once."""
    from distributed import as_completed

    run = uuid.uuid4().hex[:8]
    futures: dict = {}
    pending = iter(enumerate(paths))
    ac = as_completed()

    def submit_next() -> None:
        item = next(pending, None)
        if item is not None:
            k, path = item
            data = Path(path).read_bytes()
            fut = client.submit(
                search_bytes,
                str(path),
                data,
                settings,
                pillow_limit(),
                key=f"ss-{run}-{k}",
                retries=retries,
            )
            futures[fut] = k
            ac.add(fut)

    for _ in range(window):
        submit_next()
    with tqdm(total=len(paths), desc=f"{desc} (dask {address})", unit="img", leave=False) as bar:
        for fut in ac:
            k = futures.pop(fut)
            try:
                result = fut.result()
            except DataError:
                raise
            except Exception as e:
                raise DataError(
                    f"{paths[k]}: selective search failed on the cluster after "
                    f"{retries} retries: {type(e).__name__}: {e}"
                ) from None
            bar.update()
            submit_next()
            yield k, result
