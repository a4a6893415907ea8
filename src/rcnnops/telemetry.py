"""No usage telemetry from the tools rcnnops drives.

rcnnops runs offline (nothing is downloaded unless a user names it), and the
tools it drives do not try to send usage telemetry either: Prefect's local
server, MLflow 3 (in every process that logs) and DVC. A user's own setting of
these variables wins. The ``rcnnops`` command and the ``pipelines`` package set
them; child commands inherit them.
"""

from __future__ import annotations

import os

NO_TELEMETRY = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
}


def no_telemetry() -> None:
    """Set :data:`NO_TELEMETRY` in this process's environment (and so its
    children's) where the user has not set them."""
    for name, value in NO_TELEMETRY.items():
        os.environ.setdefault(name, value)
