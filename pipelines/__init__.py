"""Orchestration (Prefect only): the retraining flow, schedules, concurrency
slots, and the `rcnnops` command that starts them.

Importing it switches off Prefect's, MLflow's and DVC's telemetry where the user
has not set it (:func:`rcnnops.telemetry.no_telemetry`), so that a flow started from
Python, on Prefect's own ephemeral server, runs as offline as ``rcnnops run``; and
names a uid the system cannot name (:func:`rcnnops.user.name_the_user`), as the
``rcnnops`` command does, for a flow a Prefect worker starts in a container."""

from rcnnops.telemetry import no_telemetry
from rcnnops.user import name_the_user

no_telemetry()
name_the_user()


def patient_ephemeral_api(seconds: int = 120) -> None:
    """Give Prefect's ephemeral API up to ``seconds`` to start (its default, 20 s,
    is not always enough on a loaded 2-core machine: the run then fails with
    "Timed out while attempting to connect to ephemeral Prefect API server").
    An explicit ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` wins. Call
    before Prefect is imported."""
    import os

    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(seconds))


def flush_logs() -> None:
    """Send the flow's last log records to Prefect's API now, while the local
    server still runs. It stops when the run ends, and the log handler's flush at
    exit would then wait its full timeout (5 s) on a server that is gone."""
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=5)
