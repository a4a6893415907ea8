"""One pipeline run per project (issue 6, item 8): a second `rcnnops run` or flow
start, while another process holds the project's lock, refuses at once naming
the holder; once the holder exits (even killed) the next run proceeds."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.cli import main as run_cli
from rcnnops.lock import LOCK_NAME, LockedError, holder, project_lock

# Takes the lock, says so, and holds it until its stdin closes (or 60 s pass).
HOLDER = """
import sys, select
from rcnnops.lock import project_lock
with project_lock(sys.argv[1]):
    print("locked", flush=True)
    select.select([sys.stdin], [], [], 60)
"""


@pytest.fixture
def held(tmp_path):
    """(project, holder process) with the lock held by another process."""
    project = tmp_path / "project"
    project.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(project)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield project, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def _release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(10) == 0


def _refusal(project: Path, proc: subprocess.Popen) -> str:
    return (
        rf"another rcnnops run \(pid {proc.pid} on {socket.gethostname()}, started "
        rf"\d{{4}}-\d\d-\d\dT[\d:]+\+00:00\) holds {project.resolve() / LOCK_NAME}; wait for it"
    )


def test_second_run_refuses_at_once_then_proceeds(held, capsys, monkeypatch):
    project, proc = held
    t0 = time.monotonic()
    assert run_cli(["-C", str(project), "run", "--no-push"]) == 2
    assert time.monotonic() - t0 < 5  # refused before Prefect or DVC start
    err = capsys.readouterr().err
    assert err.startswith("rcnnops run: error: another rcnnops run")
    assert f"pid {proc.pid}" in err and str(project.resolve() / LOCK_NAME) in err

    _release(proc)
    import pipelines.retrain

    calls = []

    def fake_retrain(project, variants, push_to_remote):
        # The real flow takes the lock again in this process: that must not refuse.
        with project_lock(Path(project)):
            calls.append(holder(Path(project).resolve() / LOCK_NAME)["pid"])
        return []

    monkeypatch.setattr(pipelines.retrain, "retrain", fake_retrain)
    assert run_cli(["-C", str(project), "run", "--no-push"]) == 0
    assert calls == [os.getpid()]
    assert holder(project / LOCK_NAME) == {}  # released, note cleared


def test_flow_start_refuses_while_held_then_proceeds(held, monkeypatch):
    import pipelines.retrain as flow_module

    project, proc = held
    ran = []
    monkeypatch.setattr(flow_module, "_retrain", lambda root, *a: ran.append(root) or ["ok"])
    with pytest.raises(LockedError, match=_refusal(project, proc)):
        flow_module.retrain.fn(project=str(project))
    assert ran == []
    _release(proc)
    assert flow_module.retrain.fn(project=str(project)) == ["ok"]
    assert ran == [project.resolve()]


def test_waiting_serialises_and_a_killed_holder_frees_the_lock(held):
    project, proc = held
    t0 = time.monotonic()
    with pytest.raises(LockedError, match=_refusal(project, proc)), project_lock(project, 0.6):
        pass
    assert 0.5 < time.monotonic() - t0 < 5
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup runs; the kernel drops the flock
    proc.wait(10)
    assert "pid" in holder(project / LOCK_NAME)  # the note stays behind, harmlessly
    with project_lock(project, wait=5) as path:
        assert holder(path)["pid"] == os.getpid()


def test_only_one_of_two_simultaneous_starts_runs(tmp_path):
    """Two processes started together: one holds the lock, the other refuses."""
    script = """
import sys
from rcnnops.lock import LockedError, project_lock
try:
    with project_lock(sys.argv[1]):
        print("holding", flush=True)
        sys.stdin.read()  # until the test lets go
except LockedError as e:
    print("refused:", e, flush=True)
"""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        first = sorted(p.stdout.readline().strip() for p in procs)
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(30)
    assert first[0] == "holding" and first[1].startswith("refused: another rcnnops run (pid ")


# Holds the lock and runs a child command under it (as the flow's `dvc repro` does).
PARENT = """
import subprocess, sys
from rcnnops.lock import project_lock
with project_lock(sys.argv[1]):
    child = ("from rcnnops.lock import project_lock\\n"
             "with project_lock(sys.argv[1]): print('child ran')")
    out = subprocess.run([sys.executable, "-c", "import sys\\n" + child, sys.argv[1]],
                         capture_output=True, text=True)
    print(out.stdout.strip() or out.stderr.strip().splitlines()[-1])
"""


def test_manual_commands_refuse_during_a_run_and_its_own_children_inherit(held, capsys):
    """`rcnnops promote/register/train/...` typed during a run refuse naming it; the
    run's own stage commands (its children) go ahead under its lock."""
    from rcnnops.cli import main

    project, proc = held
    cwd = os.getcwd()
    os.chdir(project)
    try:
        for argv in (["promote", "faster_rcnn", "2"], ["register", "faster_rcnn"],
                     ["train", "--variant", "faster_rcnn"], ["relocate"]):  # fmt: skip
            assert main(argv) == 2, argv
            assert "another rcnnops run" in capsys.readouterr().err
    finally:
        os.chdir(cwd)
    _release(proc)
    other = project.parent / "other"
    other.mkdir()
    out = subprocess.run([sys.executable, "-c", PARENT, str(other)], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.stdout.strip() == "child ran", out.stderr
    # a stale marker naming a dead holder is ignored: the lock is taken normally
    env = {**os.environ, "RCNNOPS_PROJECT_LOCK": f"{other / LOCK_NAME}:999999"}
    code = (
        "import sys\nfrom rcnnops.lock import project_lock\n"
        "with project_lock(sys.argv[1]): print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code, str(other)], env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.stdout.strip() == "ok", out.stderr
