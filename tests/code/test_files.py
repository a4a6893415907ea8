"""Stage outputs swapped in whole: what a killed or failed stage leaves behind."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from rcnnops import files


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_swapped_in_folder_replaces_the_old_one_readable_by_others(tmp_path):
    out = tmp_path / "data" / "proposals"
    out.mkdir(parents=True)
    (out / "old.txt").write_text("old")
    before = os.umask(0o022)
    try:
        with files.replaced_dir(out, ".proposals-") as tmp:
            (tmp / "new.txt").write_text("new")
    finally:
        os.umask(before)
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert _mode(out) == 0o755  # was 0o700: another user of a shared project could not read it
    assert sorted(p.name for p in out.parent.iterdir()) == ["proposals"]


def test_a_failed_swap_keeps_the_old_folder(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def refuse(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(files.os, "replace", refuse)
    with pytest.raises(OSError, match="disk gone"), files.replaced_dir(out, ".x-") as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / "old.txt").read_text() == "old"
    with pytest.raises(ValueError), files.replaced_dir(out, ".x-"):
        raise ValueError  # the block failed: nothing swapped, nothing left
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_folders_a_killed_stage_left_are_removed_at_the_next_start(tmp_path):
    """Each SIGKILLed stage left a `.proposals-*` folder (GB-sized for COCO), never
    removed, that `git add -A` would commit."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    # the last: named before the pid was part of the name
    left = [tmp_path / f".proposals-{dead}-abc", tmp_path / f".proposals-{dead}-abc.old",
            tmp_path / ".proposals-wlcmky3d"]  # fmt: skip
    running = tmp_path / f".proposals-{os.getppid()}-def"  # a stage still at work
    for folder in (*left, running):
        (folder / "train").mkdir(parents=True)
    other = tmp_path / ".prepare-wlcmky3d"  # another stage's: not this one's to judge
    other.mkdir()
    with files.replaced_dir(tmp_path / "proposals", ".proposals-") as tmp:
        assert tmp.name.startswith(f".proposals-{os.getpid()}-")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["proposals", running.name, other.name]
    )
