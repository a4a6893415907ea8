"""Scheduled retraining: the retrain flow as a Prefect deployment with a cron schedule.

Two ways, same deployment:

* :func:`serve` (``rcnnops schedule --cron ...``): Prefect's ``serve`` in this
  process; it creates the deployment on the Prefect API and runs each scheduled
  run here, in a subprocess, until Ctrl-C.
* ``prefect.yaml`` + ``prefect deploy``: the deployment goes to a work pool and
  a worker (for example on a GPU machine) runs it.

A scheduled run is an ordinary run of the flow: DVC retrains only what changed,
so a run on unchanged data and params registers nothing new.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import EntrypointType, RunnerDeployment

from pipelines.retrain import retrain

DEFAULT_NAME = "scheduled"
DEFAULT_CRON = "0 3 * * 1"  # Mondays 03:00


def check_cron(cron: str, timezone: str | None = None) -> CronSchedule:
    """A validated cron schedule; ``ValueError`` naming the bad expression or timezone."""
    from pydantic import ValidationError

    hint = f"a cron expression is minute hour day month weekday, e.g. {DEFAULT_CRON!r}"
    if len(cron.split()) != 5:  # Prefect also takes a sixth field (seconds)
        raise ValueError(f"--cron {cron!r}: {len(cron.split())} fields, not 5 ({hint})")
    try:
        return CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as e:
        zone = [err["msg"] for err in e.errors() if "timezone" in map(str, err["loc"])]
        if zone:
            raise ValueError(f"--timezone {timezone!r}: {'; '.join(zone)}") from None
        why = "; ".join(err["msg"] for err in e.errors())
        raise ValueError(f"--cron {cron!r}: {why} ({hint})") from None


def parameters(
    project: str | Path, variants: list[str] | None = None, push_to_remote: bool = True
) -> dict[str, Any]:
    """The flow parameters each scheduled run gets (the project as an absolute path)."""
    return {
        "project": str(Path(project).resolve()),
        "variants": list(variants) if variants else None,
        "push_to_remote": push_to_remote,
    }


def deployment(
    project: str | Path,
    cron: str = DEFAULT_CRON,
    variants: list[str] | None = None,
    name: str = DEFAULT_NAME,
    timezone: str | None = None,
    push_to_remote: bool = True,
) -> RunnerDeployment:
    """The deployment (not yet sent to the API: ``.apply()`` does, :func:`serve` too).

    The flow is addressed by module path (``pipelines.retrain.retrain``), so a
    runner finds it wherever the package is installed."""
    schedule = check_cron(cron, timezone)
    return retrain.to_deployment(
        name=name,
        schedule=schedule,
        parameters=parameters(project, variants, push_to_remote),
        description=f"Retrain {', '.join(variants) if variants else 'all variants'} on '{cron}'",
        tags=["rcnnops", "retrain"],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def serve(dep: RunnerDeployment) -> None:
    """Create ``dep`` on the Prefect API and run its scheduled runs here, in
    subprocesses, until Ctrl-C (which pauses the schedule). At most one run at a
    time: two retrainings of one project would race on its files."""
    from prefect import serve as prefect_serve

    prefect_serve(dep, limit=1)
