"""rcnnops runs offline: the tools it drives send no usage telemetry unless the user
says otherwise (:mod:`rcnnops.telemetry`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from rcnnops.telemetry import NO_TELEMETRY

PROBE = "import json, os\n{setup}\nprint(json.dumps({{k: os.environ.get(k) for k in {names!r}}}))\n"


def _seen(setup: str, env: dict[str, str]) -> dict[str, str | None]:
    code = PROBE.format(setup=setup, names=sorted(NO_TELEMETRY))
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in NO_TELEMETRY}


def test_a_flow_started_from_python_runs_without_telemetry():
    """Importing the flows (to call ``retrain()`` from Python, on Prefect's own
    ephemeral server) switches telemetry off, as the ``rcnnops`` command does."""
    assert _seen("", _clean_env()) == dict.fromkeys(NO_TELEMETRY)  # nothing set before
    assert _seen("import pipelines", _clean_env()) == NO_TELEMETRY


def test_the_user_s_own_setting_wins():
    env = _clean_env() | {"MLFLOW_DISABLE_TELEMETRY": "false"}
    seen = _seen("import pipelines", env)
    assert seen["MLFLOW_DISABLE_TELEMETRY"] == "false"
    assert seen["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"


def test_dvc_s_commands_get_them(monkeypatch):
    from rcnnops.project import env

    for name in NO_TELEMETRY:
        monkeypatch.delenv(name, raising=False)
    assert {k: env()[k] for k in NO_TELEMETRY} == NO_TELEMETRY
    monkeypatch.setenv("DVC_NO_ANALYTICS", "")
    assert env()["DVC_NO_ANALYTICS"] == ""
