"""Selective-search proposals: format, determinism, caching, staleness, recall."""

import time

import numpy as np
import pytest
import torch

from rcnnops.data.prepare import load_manifest, load_split
from rcnnops.models.proposals import PrecomputedProposals
from rcnnops.proposals.precompute import (
    ProposalError,
    ProposalStore,
    SearchSettings,
    compute_split,
    precompute,
)
from rcnnops.proposals.recall import best_overlaps, recall_report
from rcnnops.proposals.selective_search import dedup, selective_search

S = SearchSettings(mode="fast", max_boxes=500, min_size=4)


def _image():
    img = np.full((64, 80, 3), 30, np.uint8)
    img[10:40, 20:50] = (220, 40, 40)
    img[45:60, 5:25] = (40, 200, 60)
    return img


def test_selective_search_format_and_determinism():
    boxes, scores = selective_search(_image(), "fast", max_boxes=300, min_size=4)
    again, _ = selective_search(_image(), "fast", max_boxes=300, min_size=4)
    assert boxes.dtype == np.float32 and boxes.shape[1] == 4 and len(boxes) == len(scores)
    assert np.array_equal(boxes, again)
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 80).all() and (boxes[:, 3] <= 64).all()
    assert (np.diff(scores) < 0).all()
    # The red square is found (x1, y1, x2, y2 = 20, 10, 50, 40).
    iou = best_overlaps(torch.tensor([[20.0, 10.0, 50.0, 40.0]]), torch.from_numpy(boxes), [300])
    assert iou[0, 0] > 0.9


def test_min_size_and_max_boxes():
    boxes, _ = selective_search(_image(), "fast", max_boxes=5, min_size=12)
    assert len(boxes) <= 5
    assert ((boxes[:, 2] - boxes[:, 0]) >= 12).all() and ((boxes[:, 3] - boxes[:, 1]) >= 12).all()


def test_large_regions_rank_first_as_in_the_paper():
    """The paper ranks from the top of the hierarchy (the whole image first), so a
    small box budget still holds a large object's box; OpenCV's inverted order
    (smallest first) filled it with small fragments."""
    rng = np.random.default_rng(0)
    img = np.full((160, 160, 3), 90, np.uint8)
    for _ in range(60):  # clutter: small patches of many colours
        y, x = rng.integers(0, 150, 2)
        img[y : y + 8, x : x + 8] = rng.integers(0, 255, 3)
    img[30:130, 34:130] = (40, 60, 210)  # a large object, with small things on it
    for _ in range(10):
        y, x = rng.integers(34, 120, 2)
        img[y : y + 6, x : x + 6] = rng.integers(0, 255, 3)
    boxes, _ = selective_search(img, "fast", max_boxes=10, min_size=4)
    big = torch.tensor([[34.0, 30.0, 130.0, 130.0]])
    assert best_overlaps(big, torch.from_numpy(boxes), [10])[0, 0] > 0.7  # was 0.52
    ranked, _ = selective_search(img, "fast", max_boxes=2000, min_size=4)
    area = (ranked[:, 2] - ranked[:, 0]) * (ranked[:, 3] - ranked[:, 1])
    quarter = len(area) // 4
    assert area[:quarter].mean() > 2 * area[-quarter:].mean()


def test_dedup_keeps_rank_order():
    b = np.array([[0, 0, 10, 10], [0, 0, 10, 10.2], [20, 20, 30, 30], [0, 0, 10.1, 10]], np.float32)
    assert dedup(b, 0.95).tolist() == [[0, 0, 10, 10], [20, 20, 30, 30]]


def test_store_round_trip_staleness_and_missing_ids(tiny_prepared, tmp_path):
    out = tmp_path / "proposals"
    precompute(tiny_prepared, out, S, workers=1)
    manifest = load_manifest(tiny_prepared)
    coco, root, _ = load_split(tiny_prepared, "val")
    store = ProposalStore(out / "val", S, manifest["splits"]["val"]["hash"])
    ids, boxes, _ = compute_split(coco, root, S, workers=1)
    for i, b in zip(ids, boxes, strict=True):
        assert np.array_equal(store[i][0].numpy(), b)  # same as recomputing: deterministic
    t0 = time.perf_counter()
    store[ids[0]]
    assert time.perf_counter() - t0 < 0.05
    with pytest.raises(ProposalError, match="stale: made with .* `dvc repro proposals`"):
        ProposalStore(out / "val", SearchSettings(mode="fast", max_boxes=100, min_size=4))
    with pytest.raises(ProposalError, match="stale: made for other data"):
        ProposalStore(out / "val", S, "0" * 64)
    with pytest.raises(ProposalError, match="no proposals for image id 99999"):
        store[99999]
    with pytest.raises(ProposalError, match="proposals not found"):
        ProposalStore(tmp_path / "nowhere", S)
    (out / "val" / "boxes.npy").write_bytes(b"garbage")
    with pytest.raises(ProposalError, match="checksum mismatch"):
        ProposalStore(out / "val", S)


def test_parallel_equals_serial(tiny_prepared):
    coco, root, _ = load_split(tiny_prepared, "train")
    _, serial, _ = compute_split(coco, root, S, workers=1)
    _, parallel, _ = compute_split(coco, root, S, workers=2)
    assert all(np.array_equal(a, b) for a, b in zip(serial, parallel, strict=True))


def test_a_dead_worker_is_one_clear_error(tiny_prepared):
    """A worker killed (say by the OOM killer) was a BrokenProcessPool traceback."""
    import os
    import signal

    from rcnnops.data.io import DataError
    from rcnnops.proposals.precompute import search_pool

    coco, root, _ = load_split(tiny_prepared, "train")
    with search_pool(1) as pool:
        os.kill(pool.submit(os.getpid).result(), signal.SIGKILL)
        time.sleep(1)  # the pool sees its worker gone
        with pytest.raises(DataError, match="worker process died .* after 0 of 12 train images; "
                           "lower proposals.workers"):  # fmt: skip
            compute_split(coco, root, S, workers=2, desc="train", pool=pool)


def test_workers_end_with_a_killed_stage(tmp_path):
    """SIGKILL of `rcnnops proposals` left its spawned workers alive (0.8 GB each)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "worker.pid"  # not a pipe: a live worker would hold it open
    subprocess.run(
        [sys.executable, "-c",
         "import os, signal, sys\n"
         "from rcnnops.proposals.precompute import search_pool\n"
         "pool = search_pool(1)\n"
         "open(sys.argv[1], 'w').write(str(pool.submit(os.getpid).result()))\n"
         "os.kill(os.getpid(), signal.SIGKILL)\n", str(out)],
        timeout=120,
    )  # fmt: skip
    worker = int(out.read_text())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(worker, 9)
        pytest.fail(f"worker {worker} outlived its stage by 20 s")


def test_proposals_rescaled_with_the_image():
    source = PrecomputedProposals(top_n_train=10, top_n_test=10).eval()
    props = [
        torch.tensor([[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 0.25, 0.25], [90.0, 40.0, 120.0, 60.0]])
    ]
    (out,) = source(props, [(50, 100)], [(100, 200)])  # image doubled
    # Scaled x2; the 0.5 px box is dropped (< 1 px); the overhanging one clipped.
    assert out.tolist() == [[20.0, 40.0, 60.0, 80.0], [180.0, 80.0, 200.0, 100.0]]
    source.train()
    assert len(PrecomputedProposals(top_n_train=1)(props, [(50, 100)], [(50, 100)])[0]) == 1


def test_recall_report_exact():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    props = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 26.0]])  # IoU 1, 0.6
    r = recall_report([(gt, props)], top_k=(1, 2), ious=(0.5, 0.7))
    assert r["recall@0.5/1"] == 0.5 and r["recall@0.5/2"] == 1.0
    assert r["recall@0.7/2"] == 0.5 and r["mabo/2"] == pytest.approx(0.8)


def test_max_side_searches_downscaled_and_returns_full_size_boxes():
    """A photo larger than ``max_side`` is searched at that size; its boxes come
    back in the photo's own pixels (inside it, about where the objects are), and
    a ``max_side`` the photo fits in changes nothing."""
    rng = np.random.default_rng(0)
    image = (rng.random((300, 480, 3)) * 40).astype(np.uint8)
    image[60:180, 100:260] = (220, 40, 40)  # one large object
    full, _ = selective_search(image)
    same, _ = selective_search(image, max_side=480)
    assert np.array_equal(full, same)
    small, _ = selective_search(image, max_side=120)
    assert len(small) > 0
    assert small[:, [0, 2]].max() <= 480 and small[:, [1, 3]].max() <= 300
    assert small[:, 2:].max() > 120  # scaled back beyond the searched size
    gt = torch.tensor([[100.0, 60.0, 260.0, 180.0]])
    assert best_overlaps(gt, torch.from_numpy(small), [2000])[0, 0] >= 0.7
