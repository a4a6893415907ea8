"""Prefect's temporary local API for one ``rcnnops run``, started at once.

With no ``PREFECT_API_URL`` configured, a flow needs Prefect's "ephemeral" API:
a server process on 127.0.0.1 for the life of the run, on the SQLite database
in ``$PREFECT_HOME``. Prefect starts it lazily, from the flow's own process,
after importing the whole server there (about 4 s of CPU on 2 cores) only to
spawn a process that imports it again. Here the same server (the same uvicorn
command and environment Prefect uses) is spawned before Prefect is imported,
so it comes up while the flow's modules load, and the flow runs against it
through ``PREFECT_API_URL`` in Prefect's settings context (no Prefect UI link is
printed: the temporary server serves no UI; and no flow-run heartbeats, which
let a lasting server notice a crashed run: this one stops with the run).

When Prefect's settings (environment, profile, ``prefect.toml``) name an API,
or ephemeral mode is switched off, the speculatively started server is stopped
and Prefect's own resolution applies unchanged. The server process gets
``SIGTERM`` if this process dies (Linux ``PR_SET_PDEATHSIG``), so a killed run
leaves no server behind.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from pipelines import patient_ephemeral_api
from rcnnops.errors import UserError

PORT_TAKEN = 3  # uvicorn's exit code when it cannot bind (and for any failed start)
RESPAWNS = 5  # ports found taken by another process in a row, at most


class LocalAPIError(UserError, RuntimeError):
    """Prefect's local API cannot start; the message says why and the way out."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _taken(port: int) -> bool:
    """Whether another process holds ``port`` on 127.0.0.1 now."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


# The server's entry point: on Linux it first asks for SIGTERM when its parent
# dies (PR_SET_PDEATHSIG; exits at once if the parent is already gone), then runs
# uvicorn as ``python -m uvicorn`` would, with no background-task worker (unless
# BACKGROUND_TASKS=1 in the environment).
BACKGROUND_TASKS = "RCNNOPS_PREFECT_BACKGROUND_TASKS"
_SERVE = """
import ctypes, os, runpy, signal, sys
parent = int(sys.argv.pop(1))
if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    if os.getppid() != parent:
        sys.exit(0)
try:  # only an optimisation: a project's own `pipelines` package must not stop the server
    from pipelines.local_api import BACKGROUND_TASKS, idle_background_worker
    if os.environ.get(BACKGROUND_TASKS) != "1":
        idle_background_worker()
except Exception:
    pass
sys.argv[0] = "uvicorn"
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
"""


def idle_background_worker() -> bool:
    """In the temporary server's process, before Prefect's server modules load:
    docket's ``Worker``, which Prefect's server runs for its background tasks, never
    picks one up. A server that lives for one run has none worth running: in
    ephemeral mode Prefect schedules database vacuums (its retention settings),
    telemetry and the evaluation of proactive automation triggers there ("no
    event within N minutes"; reactive triggers and their actions are services of
    their own and still run), and its API queues the clean-up after a deleted or
    cancelled run, which a server gone at the end of the run would not see through
    anyway. ``RCNNOPS_PREFECT_BACKGROUND_TASKS=1`` keeps Prefect's worker; a
    lasting server (``PREFECT_API_URL``), which automations want, is not touched.
    Idle, that loop cost 0.7 % of a core (its cancellation listener polls ten times
    a second): the server took 1.2 % of a core with it, 0.5 % without (30 s idle,
    2026-12-04), about 1.2 s of CPU beside the quick project's 3 minutes of stages.
    Prefect exposes no setting for this; if docket's ``Worker`` has no
    ``run_forever``, nothing changes. Returns whether it did."""
    import asyncio

    try:
        import docket
    except ImportError:
        return False
    if not callable(getattr(docket.Worker, "run_forever", None)):
        return False

    class IdleWorker(docket.Worker):
        async def run_forever(self) -> None:  # until the server cancels it at shutdown
            await asyncio.Event().wait()

    docket.Worker = IdleWorker
    return True


class LocalAPI:
    """A Prefect API server process on 127.0.0.1; :meth:`wait` until it answers."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.process = self._spawn()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _spawn(self) -> subprocess.Popen:
        spec = importlib.util.find_spec("prefect")
        assert spec is not None and spec.origin is not None
        env = os.environ | {
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
        }
        argv = [sys.executable, "-c", _SERVE, str(os.getpid())]
        argv += ["--app-dir", str(Path(spec.origin).parents[1])]
        argv += ["--factory", "prefect.server.api.server:create_app"]
        argv += ["--host", "127.0.0.1", "--port", str(self.port)]
        argv += ["--log-level", "error", "--lifespan", "on"]
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)

    def wait(self, timeout: float) -> None:
        """Until ``/health`` answers; a port taken meanwhile is retried on another.
        Raises :class:`LocalAPIError` naming the server's exit code or the timeout.
        uvicorn exits with the same code for a port taken and for any other failed
        start (a database it cannot open): only the first is retried."""
        deadline, respawns = time.monotonic() + timeout, 0
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code == PORT_TAKEN and respawns < RESPAWNS and _taken(self.port):
                respawns += 1
                self.port = _free_port()
                self.process = self._spawn()
            elif code is not None:
                raise LocalAPIError(
                    f"Prefect's local API server exited with code {code} before answering "
                    f"(its output is above); set PREFECT_API_URL to use a running server"
                )
            if self._healthy():
                return
            time.sleep(0.1)
        self.stop()
        raise LocalAPIError(
            f"Prefect's local API server did not answer within {timeout:.0f} s "
            "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); set PREFECT_API_URL "
            "to use a running server"
        )

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as answer:
                return answer.status == 200
        except OSError:  # refused, reset, timed out, an HTTP error status
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


_running: LocalAPI | None = None


def _sqlite_path(url: str | None) -> Path | None:
    """The file of a SQLite database URL (``sqlite+aiosqlite:////abs/prefect.db``,
    ``sqlite:///relative.db?timeout=30``); None for another database, an in-memory
    one or a ``file:`` URI."""
    if not url or not url.startswith("sqlite") or ":///" not in url:
        return None
    path = url.split(":///", 1)[1].split("?", 1)[0]
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    return Path(path).expanduser().resolve()


def _database_problem(path: Path | None) -> str | None:
    """Why the server could not make or open its SQLite database ``path`` (its
    folder cannot be made or written: a home that is not writable, as in a
    container run as another user), or None. The server itself would only fail
    its start-up, with a traceback, on every attempt."""
    if path is None:
        return None
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        reason = e.strerror or type(e).__name__
    else:
        if os.access(folder, os.W_OK | os.X_OK):
            return None
        reason = "not writable"
    return (
        f"Prefect's local database {path} cannot be made: its folder {folder} "
        f"cannot be used ({reason}); set PREFECT_HOME to a folder you can write "
        "(e.g. `export PREFECT_HOME=/tmp/prefect-$USER`), or PREFECT_API_URL to a "
        "running Prefect server"
    )


def _new_database() -> Path | None:
    """The SQLite file Prefect's server will make when it starts, if it does not
    exist: the environment's database URL, else ``$PREFECT_HOME/prefect.db``
    (Prefect's default; checked against its settings before saying anything)."""
    url = os.environ.get("PREFECT_SERVER_DATABASE_CONNECTION_URL") or os.environ.get(
        "PREFECT_API_DATABASE_CONNECTION_URL"
    )
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect")
    path = _sqlite_path(url) if url else (home / "prefect.db").expanduser().resolve()
    return path if path is not None and not path.exists() else None


def running() -> bool:
    """Whether this process's flow runs on a temporary local API (ours)."""
    return _running is not None


@contextlib.contextmanager
def local_api(meanwhile: Callable[[], object] | None = None) -> Iterator[str | None]:
    """Run the enclosed flow on a temporary local Prefect API unless Prefect's
    settings name one; yields the URL in use (``None``: Prefect's own choice).

    Enter it before Prefect is imported: the server starts first, Prefect's
    settings are read while it comes up. ``meanwhile`` is called then too (this
    process waits idle for the server otherwise: work such as imports the flow
    needs later costs nothing there). The server is given
    ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` to answer (see
    :func:`pipelines.patient_ephemeral_api`)."""
    global _running
    patient_ephemeral_api()
    new_database = _new_database()  # before the server can make it
    api = None if os.environ.get("PREFECT_API_URL") else LocalAPI()
    try:
        # Prefect's settings first (about 1 s): a server they do not want stops at
        # once, and the first run's message comes before the long wait, not after it
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
            PREFECT_SERVER_ALLOW_EPHEMERAL_MODE,
            PREFECT_SERVER_DATABASE_CONNECTION_URL,
            PREFECT_UI_URL,
            temporary_settings,
        )

        if api is not None and (
            PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value()
        ):
            api.stop()
            api = None
        database = _sqlite_path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value())
        if api is not None and (problem := _database_problem(database)):
            raise LocalAPIError(problem)  # (the server is stopped on the way out)
        if api is not None and new_database and database == new_database:
            print(
                f"Prefect: creating its local database {new_database} (once per machine; "
                "about 13 s more on 2 CPU cores)",
                flush=True,
            )
        if meanwhile is not None:
            meanwhile()
        if api is None:
            yield None
            return
        api.wait(float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]))
        _running = api
        # No flow-run heartbeats: they tell a lasting server that a run is alive,
        # and this one ends with the run (their thread also holds the flow's end
        # up to 1 s, the granularity of its sleep).
        local = {
            PREFECT_API_URL: api.url,
            PREFECT_UI_URL: "",
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
        }
        with temporary_settings(local):
            yield api.url
    finally:
        _running = None
        if api is not None:
            api.stop()
