"""Orchestration (Prefect only): the retraining flow, schedules, concurrency
slots, and the `rcnnops` command that starts them."""

from __future__ import annotations

import threading


def patient_ephemeral_api(seconds: int = 120) -> None:
    """Give Prefect's ephemeral API up to ``seconds`` to start (its default, 20 s,
    is not always enough on a loaded 2-core machine: the run then fails with
    "Timed out while attempting to connect to ephemeral Prefect API server").
    An explicit ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` wins. Call
    before Prefect is imported."""
    import os

    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(seconds))


def start_ephemeral_api() -> threading.Thread:
    """Start Prefect's ephemeral API in a background thread, so that its server
    process (about 8 s to come up on a 2-core machine) starts while the flow's
    modules import; join the returned thread before running the flow. Nothing
    to do when a Prefect server is configured (``PREFECT_API_URL``). A failure
    is left for the flow's own start, which retries and reports it."""
    import contextlib

    def start() -> None:
        from prefect.settings import PREFECT_API_URL

        if PREFECT_API_URL.value():
            return
        from prefect.server.api.server import SubprocessASGIServer

        with contextlib.suppress(Exception):
            SubprocessASGIServer().start()

    thread = threading.Thread(target=start, name="prefect-api-start", daemon=True)
    thread.start()
    return thread


def flush_logs() -> None:
    """Send the flow's last log records to Prefect's API now, while the ephemeral
    server still runs. At exit Prefect stops that server first, and the log
    handler's flush then waits its full timeout (5 s) on a server that is gone."""
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=5)
