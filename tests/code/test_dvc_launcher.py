"""DVC commands forked by the launcher (rcnnops.dvc_launcher) are the commands run
as processes: same output, files, lock file, exit code and error; concurrent
commands keep their own environments; a dead launcher falls back to a process."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import dvc
import pytest

from rcnnops import dvc_launcher
from rcnnops import project as dvcproj

pytestmark = pytest.mark.skipif(
    not dvc_launcher.supported(), reason="forking DVC commands: Linux only, or switched off"
)

SAY = (
    "python -c \"import os, sys; open('{out}', 'w').write(os.environ['GREETING'] + ' ' + "
    "os.getcwd()); print('said', os.environ['GREETING']); print('on stderr', file=sys.stderr)\""
)
DVC_YAML = f"""stages:
  hello:
    cmd: {SAY.format(out="hello.txt")}
    outs: [hello.txt]
  other:
    cmd: {SAY.format(out="other.txt")}
    outs: [other.txt]
  fail:
    cmd: python -c "import sys; print('failing'); sys.exit(3)"
"""


@pytest.fixture
def dvc_project(tmp_path: Path) -> Path:
    proj = tmp_path / "proj"
    proj.mkdir()
    dvcproj.ensure_dvc(proj, None)
    (proj / "dvc.yaml").write_text(DVC_YAML)
    return proj


@pytest.fixture
def forks(monkeypatch) -> list:
    """What each launcher request returned (a Forked, or None for a process)."""
    seen, spawn = [], dvc_launcher.spawn

    def recording(*args):
        seen.append(result := spawn(*args))
        return result

    monkeypatch.setattr(dvc_launcher, "spawn", recording)
    return seen


def _clean(proj: Path) -> None:
    for name in ("hello.txt", "other.txt", "dvc.lock"):
        (proj / name).unlink(missing_ok=True)
    shutil.rmtree(proj / ".dvc" / "cache", ignore_errors=True)


def _lines(text: str) -> list[str]:
    return sorted(ln.strip() for ln in text.splitlines() if ln.strip())


def _locks_both_ways(proj: Path, stages: tuple[str, ...]) -> tuple[str, str]:
    """dvc.lock after ``stages`` forced one after the other (``GREETING`` set to the
    stage's name), run as processes, then again (from clean) forked by the launcher."""

    def run() -> str:
        for stage in stages:
            dvcproj.repro(proj, stage, force=True, extra_env={"GREETING": stage})
        return (proj / "dvc.lock").read_text()

    by_process = run()
    _clean(proj)
    with dvc_launcher.running(dvcproj.env()):
        return by_process, run()


def test_a_forked_command_is_the_command_run_as_a_process(dvc_project, forks, capfd):
    ran = dvcproj.repro(dvc_project, "hello", extra_env={"GREETING": "hi"})
    by_process = capfd.readouterr().out
    files = (dvc_project / "hello.txt").read_text(), (dvc_project / "dvc.lock").read_text()
    assert forks == [None]  # no launcher: a process
    _clean(dvc_project)

    with dvc_launcher.running(dvcproj.env()) as launcher:
        assert launcher is not None
        assert dvcproj.repro(dvc_project, "hello", extra_env={"GREETING": "hi"}) == ran
    forked = capfd.readouterr().out
    assert isinstance(forks[1], dvc_launcher.Forked)
    assert ran == ["hello"]
    assert _lines(forked) == _lines(by_process)
    assert "said hi" in forked and "on stderr" in forked  # both streams, passed through
    assert (dvc_project / "hello.txt").read_text() == files[0] == f"hi {dvc_project}"
    assert (dvc_project / "dvc.lock").read_text() == files[1]
    assert launcher.process.poll() == 0  # gone with its block


def test_forked_commands_write_the_lock_file_a_process_writes(dvc_project, forks, capfd):
    """The launcher reads and writes DVC's YAML its own quicker way (rcnnops.dvc_yaml):
    dvc.lock, updated stage after stage, is the same file."""

    by_process, forked = _locks_both_ways(dvc_project, ("hello", "other", "hello"))
    assert {type(f) for f in forks} == {type(None), dvc_launcher.Forked}
    assert forked == by_process
    assert "hello:" in forked and "other:" in forked


def test_a_plain_lock_file_written_the_quick_way_is_the_same_file(tmp_path, forks):
    """Stages whose lock entries are plain (as rcnnops' are): the launcher writes
    dvc.lock with libyaml's emitter (rcnnops.dvc_yaml), byte for byte DVC's file."""
    import yaml

    from rcnnops import dvc_yaml

    proj = tmp_path / "plain"
    proj.mkdir()
    dvcproj.ensure_dvc(proj, None)
    (proj / "write.py").write_text("import sys; open(sys.argv[1], 'w').write(sys.argv[1])\n")
    (proj / "params.yaml").write_text("lr: 0.02\nname: run-1\nsteps: [1, 2]\nnone:\n")
    stages = "".join(
        f"  {name}:\n    cmd: python write.py {name}.txt\n    deps: [write.py]\n"
        f"    params: [lr, name, steps, none]\n    outs: [{name}.txt]\n"
        for name in ("one", "two")
    )
    (proj / "dvc.yaml").write_text("stages:\n" + stages)

    by_process, forked = _locks_both_ways(proj, ("one", "two", "one"))
    assert {type(f) for f in forks} == {type(None), dvc_launcher.Forked}
    assert dvc_yaml.same_as_ruamel(yaml.safe_load(forked))  # the quick way was taken
    assert forked == by_process


def test_a_failed_forked_command_fails_as_the_process_does(dvc_project, forks):
    with pytest.raises(dvcproj.StageError) as by_process:
        dvcproj.repro(dvc_project, "fail")
    with dvc_launcher.running(dvcproj.env()), pytest.raises(dvcproj.StageError) as forked:
        dvcproj.repro(dvc_project, "fail")
    assert [type(f) for f in forks] == [type(None), dvc_launcher.Forked]
    assert str(forked.value) == str(by_process.value)
    assert "(exit 255)" in str(forked.value) and "exited with 3" in str(forked.value)


def test_concurrent_forked_commands_keep_their_own_environment(dvc_project, forks):
    errors: list[BaseException] = []

    def run(stage: str, greeting: str) -> None:
        try:
            dvcproj.repro(dvc_project, stage, extra_env={"GREETING": greeting})
        except BaseException as e:  # reported below
            errors.append(e)

    with dvc_launcher.running(dvcproj.env()):
        threads = [
            threading.Thread(target=run, args=("hello", "first")),
            threading.Thread(target=run, args=("other", "second")),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert len(forks) == 2 and all(isinstance(f, dvc_launcher.Forked) for f in forks)
    assert (dvc_project / "hello.txt").read_text() == f"first {dvc_project}"
    assert (dvc_project / "other.txt").read_text() == f"second {dvc_project}"
    assert not {"hello", "other"} & set(dvcproj.status(dvc_project))


def test_a_dead_launcher_falls_back_to_a_process(dvc_project, forks):
    with dvc_launcher.running(dvcproj.env()) as launcher:
        launcher.process.kill()
        launcher.process.wait()
        assert dvcproj.repro(dvc_project, "hello", extra_env={"GREETING": "hi"}) == ["hello"]
    assert forks == [None]
    assert (dvc_project / "hello.txt").read_text() == f"hi {dvc_project}"


def test_the_launcher_stops_when_its_caller_lets_go(dvc_project):
    with dvc_launcher.running(dvcproj.env()) as launcher:
        with dvc_launcher.running(dvcproj.env()) as nested:
            assert nested is None  # one per process: the outer one serves
        forked = dvc_launcher.spawn(["--version"], dvc_project, dvcproj.env())
        assert forked is not None
        assert forked.stdout.read().decode().strip() == dvc.__version__
        assert forked.wait() == 0
    assert launcher.process.wait(timeout=5) == 0
    assert dvc_launcher.spawn(["--version"], dvc_project, dvcproj.env()) is None


def test_switched_off_dvc_commands_run_as_processes(dvc_project, forks, monkeypatch):
    monkeypatch.setenv("RCNNOPS_DVC_LAUNCHER", "0")
    with dvc_launcher.running(dvcproj.env()) as launcher:
        assert launcher is None
        assert dvcproj.repro(dvc_project, "hello", extra_env={"GREETING": "hi"}) == ["hello"]
    assert forks == [None]
