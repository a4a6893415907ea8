"""Incremental proposals: the per-image cache, and the Dask cluster path.

A rerun after adding, changing or damaging images searches exactly those images,
and the store it writes is byte-identical to a from-scratch run's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rcnnops.config import DataParams, PrepareParams, SplitSource
from rcnnops.data.prepare import load_split, prepare
from rcnnops.data.shapes import generate
from rcnnops.proposals import executors
from rcnnops.proposals.cache import ProposalCache
from rcnnops.proposals.precompute import SearchSettings, precompute, search_split
from tests.conftest import TINY

S = SearchSettings(mode="fast", max_boxes=300, min_size=4)
FILES = ("boxes.npy", "scores.npy", "index.json")


def _prepare(raw: Path, train_json: str, out: Path) -> Path:
    data = DataParams(
        root=str(raw),
        train=SplitSource(annotations=f"annotations/{train_json}", images="train"),
        val=SplitSource(annotations="annotations/instances_val.json", images="val"),
    )
    prepare(data, PrepareParams(out=str(out)))
    return out


def _same_store(a: Path, b: Path) -> None:
    for split in ("train", "val"):
        for name in FILES:
            assert (a / split / name).read_bytes() == (b / split / name).read_bytes(), (split, name)


@pytest.fixture
def raw40(tmp_path) -> Path:
    """40 training images and 6 validation ones; ``instances_train_95.json`` lacks
    the last 2 training images (5 %)."""
    raw = generate(TINY.model_copy(update=dict(out=str(tmp_path / "raw"), num_train=40)))
    coco = json.loads((raw / "annotations/instances_train.json").read_text())
    keep = sorted(im["id"] for im in coco["images"])[:-2]
    part = dict(
        coco,
        images=[im for im in coco["images"] if im["id"] in keep],
        annotations=[a for a in coco["annotations"] if a["image_id"] in keep],
    )
    (raw / "annotations/instances_train_95.json").write_text(json.dumps(part))
    return raw


def test_adding_and_changing_images_searches_only_those(raw40, tmp_path):
    cache = tmp_path / "cache"
    before = _prepare(raw40, "instances_train_95.json", tmp_path / "prepared95")
    first = precompute(before, tmp_path / "p95", S, workers=1, cache_dir=cache)
    assert (first["train"]["searched"], first["train"]["from_cache"]) == (38, 0)
    assert (first["val"]["searched"], first["val"]["from_cache"]) == (6, 0)

    # 2 new training images, and one validation image changed (one pixel).
    val = sorted((raw40 / "val").iterdir())[0]
    pixels = np.array(Image.open(val))
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(val)
    after = _prepare(raw40, "instances_train.json", tmp_path / "prepared")
    again = precompute(after, tmp_path / "p", S, workers=1, cache_dir=cache)
    assert (again["train"]["searched"], again["train"]["from_cache"]) == (2, 38)
    assert (again["val"]["searched"], again["val"]["from_cache"]) == (1, 5)

    scratch = precompute(after, tmp_path / "scratch", S, workers=1)
    assert scratch["train"]["searched"] == 40 and scratch["train"]["from_cache"] == 0
    _same_store(tmp_path / "p", tmp_path / "scratch")


def test_a_damaged_entry_is_searched_again_and_other_settings_miss(tiny_prepared, tmp_path):
    cache_dir = tmp_path / "cache"
    precompute(tiny_prepared, tmp_path / "a", S, workers=1, cache_dir=cache_dir)
    entries = sorted(cache_dir.glob("*/*/*.npz"))
    assert len(entries) == 18  # one per image (12 train + 6 val), no temporary files left
    assert not list(cache_dir.rglob(".*"))
    entries[0].write_bytes(entries[0].read_bytes()[:100])  # a truncated entry
    again = precompute(tiny_prepared, tmp_path / "b", S, workers=1, cache_dir=cache_dir)
    assert again["train"]["searched"] + again["val"]["searched"] == 1
    _same_store(tmp_path / "a", tmp_path / "b")
    assert ProposalCache(cache_dir, S.as_dict()).get(entries[0].stem) is not None  # replaced

    other = SearchSettings(mode="fast", max_boxes=100, min_size=4)
    third = precompute(tiny_prepared, tmp_path / "c", other, workers=1, cache_dir=cache_dir)
    assert third["train"]["searched"] == 12 and third["val"]["searched"] == 6
    keys = sorted(p.name for p in cache_dir.iterdir())
    assert len(keys) == 2  # one folder per settings, each saying what it holds
    assert {
        json.loads((cache_dir / k / "settings.json").read_text())["max_boxes"] for k in keys
    } == {
        100,
        300,
    }


def test_the_cache_keeps_the_most_recently_used_settings(tiny_prepared, tmp_path, capsys):
    """Trying three settings one after the other with ``cache_keep=2`` leaves the
    one in use and the one before; the first's entries are removed and counted.
    Going back to the kept one searches nothing."""
    cache_dir = tmp_path / "cache"

    def run(max_boxes: int, out: str) -> dict:
        settings = SearchSettings(mode="fast", max_boxes=max_boxes, min_size=4)
        return precompute(
            tiny_prepared, tmp_path / out, settings, workers=1, cache_dir=cache_dir, cache_keep=2
        )

    def kept() -> set[int]:
        return {
            json.loads((d / "settings.json").read_text())["max_boxes"] for d in cache_dir.iterdir()
        }

    run(300, "a")
    run(100, "b")
    assert kept() == {300, 100} and "proposal cache" not in capsys.readouterr().out
    first = ProposalCache(
        cache_dir, SearchSettings(mode="fast", max_boxes=300, min_size=4).as_dict()
    )
    size = sum(f.stat().st_size for f in first.dir.glob("*/*.npz"))
    run(50, "c")
    assert kept() == {100, 50}
    out = capsys.readouterr().out
    assert f"proposal cache: removed 1 older settings' entries (18 images, {size / 1e6:.1f} MB) " \
        "beyond proposals.cache_keep=2" in out  # fmt: skip
    again = run(100, "d")  # back to a kept one: nothing searched, nothing removed
    assert again["train"]["searched"] == 0 and again["val"]["searched"] == 0
    assert kept() == {100, 50} and "removed" not in capsys.readouterr().out
    # A prune killed between hiding a key and removing it left the hidden folder
    # (settings and all): the next prune removes it and counts it for nothing.
    (cache_dir / ".pruned-0123456789abcdef" / "ab").mkdir(parents=True)
    (cache_dir / ".pruned-0123456789abcdef" / "settings.json").write_text('{"max_boxes": 7}')
    (cache_dir / ".pruned-0123456789abcdef" / "ab" / "ab00.npz").write_bytes(b"x")
    run(300, "e")  # 50 was used longest ago
    assert kept() == {100, 300}
    assert "removed 1 older settings' entries (18 images" in capsys.readouterr().out
    assert sorted(p.name for p in cache_dir.iterdir() if p.name.startswith(".")) == []


@pytest.mark.scale  # (parallel == serial is in make test: test_proposals.py)
def test_parallel_run_fills_the_cache_the_same(tiny_prepared, tmp_path):
    precompute(tiny_prepared, tmp_path / "one", S, workers=1, cache_dir=tmp_path / "c1")
    precompute(tiny_prepared, tmp_path / "two", S, workers=2, cache_dir=tmp_path / "c2")
    _same_store(tmp_path / "one", tmp_path / "two")
    a = sorted(p.relative_to(tmp_path / "c1") for p in (tmp_path / "c1").rglob("*.npz"))
    b = sorted(p.relative_to(tmp_path / "c2") for p in (tmp_path / "c2").rglob("*.npz"))
    assert a == b and len(a) == 18


def test_cluster_address_comes_from_params_then_the_environment(monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    assert executors.cluster_address(None) is None
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://10.0.0.5:8786")
    assert executors.cluster_address(None) == "tcp://10.0.0.5:8786"
    assert executors.cluster_address("tcp://127.0.0.1:8786") == "tcp://127.0.0.1:8786"


@pytest.mark.scale
def test_a_dask_cluster_makes_the_local_store(tiny_prepared, tmp_path):
    """A real scheduler and 2 worker processes on 127.0.0.1; the images go as bytes."""
    from distributed import LocalCluster

    from rcnnops.data.io import DataError

    precompute(tiny_prepared, tmp_path / "local", S, workers=2)
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=None,
    ) as cluster:  # fmt: skip
        address = cluster.scheduler_address
        assert address.startswith("tcp://127.0.0.1:")
        summary = precompute(
            tiny_prepared, tmp_path / "dask", S, workers=2, cache_dir=tmp_path / "c",
            cluster=address,
        )  # fmt: skip
        assert summary["train"]["searched"] == 12 and summary["val"]["searched"] == 6
        _same_store(tmp_path / "local", tmp_path / "dask")

        # An image no worker can read fails the split naming it (after Dask's retries).
        coco, root, _ = load_split(tiny_prepared, "val")
        bad = tmp_path / "bad"
        shutil.copytree(root, bad)
        victim = sorted(coco["images"], key=lambda im: im["id"])[0]["file_name"]
        (bad / victim).write_bytes(b"not an image")
        with pytest.raises(DataError, match=Path(victim).name):
            search_split(coco, bad, S, 2, cluster=address)


def test_the_stage_reports_recall_at_the_boxes_it_keeps(tmp_path, capsys):
    """The summary line said "recall@0.5 (2000)" whatever `max_boxes` was; it is the
    recall of the boxes kept (recorded in metrics.json too)."""
    import yaml

    from rcnnops.config import load_params
    from rcnnops.data import prepare as prepare_stage
    from rcnnops.proposals import precompute as stage
    from tests.code.trained import inside, write_project

    root = write_project(tmp_path / "p", ["fast_rcnn"])
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["proposals"]["max_boxes"] = 50
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with inside(root):
        p = load_params("params.yaml")
        generate(p.generate)
        prepare_stage.run(p)
        capsys.readouterr()
        stage.run(p)
        lines = [line for line in capsys.readouterr().out.splitlines() if "recall@0.5" in line]
        metrics = json.loads((Path(p.evaluate.out) / "proposals/metrics.json").read_text())
    assert len(lines) == 2 and all("recall@0.5 (top 50) " in line for line in lines), lines
    assert f"(top 50) {metrics['val']['recall@0.5/50']:.3f}, @0.7 " in lines[1]
