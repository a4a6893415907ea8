"""The temporary local Prefect API of ``rcnnops run`` (:mod:`pipelines.local_api`):
a real server process on 127.0.0.1 that the flow runs against, stopped with the
run, and never left behind by a killed run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pipelines.local_api import local_api


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def unconfigured(harness, monkeypatch):
    """No API named anywhere, as on a fresh machine. The server it gets uses the
    test harness's database (already migrated: a new one costs ~15 s)."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_DATABASE_CONNECTION_URL,
        temporary_settings,
    )

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    database = PREFECT_SERVER_DATABASE_CONNECTION_URL.value()
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", database)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        yield


def test_a_flow_runs_on_the_local_api_which_stops_with_it(unconfigured, capsys):
    from prefect import flow, task
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, PREFECT_UI_URL

    import pipelines.local_api as module

    @task
    def api_in_a_task() -> str | None:
        return PREFECT_API_URL.value()

    @flow
    def probe() -> list:
        return [api_in_a_task(), api_in_a_task.submit().result(), PREFECT_UI_URL.value()]

    called = []
    with local_api(meanwhile=lambda: called.append(module._running)) as url:
        server = module._running.process
        assert url == f"http://127.0.0.1:{module._running.port}/api" and module.running()
        assert called == [None]  # while the server started, before the run used it
        assert httpx.get(f"{url}/health").status_code == 200
        assert probe() == [url, url, ""]  # every thread on it; no UI link to a temporary server
        assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() is None  # nobody to watch them
    assert server.poll() is not None and not module.running()
    assert PREFECT_API_URL.value() is None
    assert "creating its local database" not in capsys.readouterr().out  # it exists


def test_a_database_the_server_is_to_make_is_announced(unconfigured, monkeypatch, capsys):
    """The first run on a machine waits about 13 s more for Prefect to make its database:
    it says so at once, naming the file, when that file is the one Prefect's settings
    use."""
    import pipelines.local_api as module

    made = module._sqlite_path(os.environ["PREFECT_SERVER_DATABASE_CONNECTION_URL"])
    monkeypatch.setattr(module, "_new_database", lambda: made)  # as if it did not exist yet
    said: list[str] = []
    with local_api(meanwhile=lambda: said.append(capsys.readouterr().out)):
        pass
    # said before the flow's imports (``meanwhile``) and the wait, not after them
    assert f"Prefect: creating its local database {made} (once per machine" in said[0]
    monkeypatch.setattr(module, "_new_database", lambda: made.with_name("another.db"))
    with local_api():
        pass
    assert "creating" not in capsys.readouterr().out  # not the database in use: nothing said


def test_which_database_the_server_is_to_make(tmp_path, monkeypatch):
    from pipelines.local_api import _new_database

    for name in ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    assert _new_database() == tmp_path / "home" / "prefect.db"
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "prefect.db").touch()
    assert _new_database() is None  # made already
    monkeypatch.setenv(
        "PREFECT_SERVER_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"
    )
    assert _new_database() == tmp_path / "x.db"
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", "postgresql+asyncpg://db/prefect")
    assert _new_database() is None  # not a file


def test_the_sqlite_file_of_a_database_url(tmp_path, monkeypatch):
    from pipelines.local_api import _sqlite_path

    monkeypatch.chdir(tmp_path)
    assert _sqlite_path("sqlite+aiosqlite:////abs/prefect.db") == Path("/abs/prefect.db")
    assert _sqlite_path("sqlite:///rel.db?timeout=30") == tmp_path.resolve() / "rel.db"
    for url in (
        "sqlite+aiosqlite:///:memory:",
        "sqlite+aiosqlite:///file::memory:?cache=shared",
        "sqlite://",
        "postgresql+asyncpg://db/prefect",
        None,
    ):
        assert _sqlite_path(url) is None, url


def test_a_configured_api_is_used_and_nothing_is_started(harness, monkeypatch):
    """Under a Prefect server named in the settings (here the test harness's), the
    speculatively started server is stopped and Prefect's choice stands."""
    from prefect.settings import PREFECT_API_URL

    import pipelines.local_api as module

    spawned = []
    real = module.LocalAPI._spawn
    monkeypatch.setattr(
        module.LocalAPI, "_spawn", lambda self: spawned.append(real(self)) or spawned[-1]
    )
    configured = PREFECT_API_URL.value()
    with local_api() as url:
        assert url is None and not module.running()
        assert PREFECT_API_URL.value() == configured
    assert len(spawned) == 1 and spawned[0].poll() is not None


@pytest.mark.scale  # a second flow process and server (~10 s): in the scale suite CI runs
def test_a_killed_run_leaves_no_server_behind(unconfigured):
    script = (
        "import sys, time\n"
        "import pipelines.local_api as m\n"
        "with m.local_api() as url:\n"
        "    print(m._running.process.pid, flush=True); time.sleep(120)\n"
    )
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        server = int(run.stdout.readline())
    finally:
        run.kill()
        run.wait()
    assert _gone(server, within=15), f"the local API server (pid {server}) outlived its run"


def test_a_server_that_cannot_start_is_an_error_naming_the_way_out(unconfigured, monkeypatch):
    import pipelines.local_api as module

    monkeypatch.setattr(module, "_SERVE", "import sys; sys.exit(7)")
    with pytest.raises(RuntimeError, match="exited with code 7.*PREFECT_API_URL"), local_api():
        pass
    assert not module.running()


@pytest.fixture
def spawned(monkeypatch) -> list[int]:
    """One entry per server process the local API spawns."""
    import pipelines.local_api as module

    spawns: list[int] = []
    real_spawn = module.LocalAPI._spawn
    monkeypatch.setattr(
        module.LocalAPI, "_spawn", lambda self: spawns.append(1) or real_spawn(self)
    )
    return spawns


def test_a_database_folder_it_cannot_write_is_one_clear_error(
    unconfigured, spawned, monkeypatch, tmp_path
):
    """A home that is not writable (a container run as another user): one error that
    names the folder and the way out, at once, not a server failing its start-up
    over and over until the start-up timeout."""
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL, temporary_settings

    import pipelines.local_api as module

    not_a_folder = tmp_path / "home"
    not_a_folder.write_text("a file where the folder should be")
    db = not_a_folder / ".prefect" / "prefect.db"
    url = f"sqlite+aiosqlite:///{db}"
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", url)  # the server's
    settings = temporary_settings({PREFECT_SERVER_DATABASE_CONNECTION_URL: url})  # this process's
    cannot = r"home/\.prefect cannot be used.*PREFECT_HOME"
    with settings, pytest.raises(module.LocalAPIError, match=cannot), local_api():
        pass
    assert spawned == [1] and not module.running()


def test_a_failed_start_is_retried_only_when_its_port_was_taken(unconfigured, spawned, monkeypatch):
    """uvicorn exits with 3 both when its port is taken and when its start-up fails:
    a free port means the start failed, which is reported, not retried."""
    import pipelines.local_api as module

    monkeypatch.setattr(module, "_SERVE", "import sys; sys.exit(3)")
    with pytest.raises(module.LocalAPIError, match="exited with code 3"), local_api():
        pass
    assert spawned == [1]


def test_a_port_another_process_holds_is_retried_on_another(unconfigured, monkeypatch):
    import socket

    import pipelines.local_api as module

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    ports = [holder.getsockname()[1]]
    real_free_port = module._free_port
    monkeypatch.setattr(module, "_free_port", lambda: ports.pop(0) if ports else real_free_port())
    try:
        with local_api() as url:
            assert url and f":{holder.getsockname()[1]}/" not in url
            assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    finally:
        holder.close()


def test_the_local_server_s_background_worker_runs_nothing():
    """The temporary server's docket ``Worker`` (Prefect's, for its background
    tasks) takes no task, and stops when cancelled, as Prefect's server does at
    shutdown; a docket worker built the usual way takes the task. In a process of
    its own, as in the server's."""
    import subprocess
    import sys

    code = (
        "import asyncio, sys\n"
        "if sys.argv[1] == 'idle':\n"
        "    from pipelines.local_api import idle_background_worker\n"
        "    assert idle_background_worker()\n"
        "from docket import Docket, Worker\n"
        "from prefect.server.api import background_workers\n"  # what Prefect's server builds
        "assert background_workers.Worker is Worker\n"
        "ran = []\n"
        "async def job(): ran.append(1)\n"
        "async def main():\n"
        "    async with Docket(name='idle-test', url='memory://') as d:\n"
        "        d.register(job)\n"
        "        await d.add(job)()\n"
        "        async with Worker(d) as w:\n"
        "            t = asyncio.create_task(w.run_forever())\n"
        "            await asyncio.sleep(2)\n"
        "            t.cancel()\n"
        "            try:\n"
        "                await t\n"
        "            except asyncio.CancelledError:\n"
        "                pass\n"
        "    print(len(ran))\n"
        "asyncio.run(main())\n"
    )
    for mode, expected in (("idle", "0"), ("usual", "1")):
        done = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == expected, (mode, done.stdout)


def test_a_project_s_own_pipelines_package_does_not_stop_the_server(
    unconfigured, tmp_path, monkeypatch
):
    """The server's process starts in the project, first on its path: a project with
    a ``pipelines`` package of its own (here one that fails to import) still gets a
    server; only the idle background worker is lost."""
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "__init__.py").write_text("raise ImportError('not ours')\n")
    monkeypatch.chdir(tmp_path)
    with local_api() as url:
        assert httpx.get(f"{url}/health").status_code == 200
