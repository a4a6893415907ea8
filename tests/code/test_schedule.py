"""Scheduled retraining: the deployment and its cron schedule on a real Prefect API
(the test harness). The no-op scheduled run (a run created from the deployment on
an up-to-date project retrains and registers nothing) is part of test_flow.py,
which has such a project at hand."""

import pytest
from prefect import get_client

from pipelines import schedule
from pipelines.cli import main


def test_bad_cron_is_refused_before_serving(capsys):
    assert main(["schedule", "--cron", "61 3 * * *"]) == 2
    assert "Invalid cron string" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Invalid timezone") as bad_zone:
        schedule.check_cron("0 3 * * 1", "Mars/Olympus")
    assert "cron" not in str(bad_zone.value)  # the cron was fine: no cron advice
    # Prefect also takes six fields (seconds): not what `--help`'s five fields say
    with pytest.raises(ValueError, match=r"--cron '\* \* \* \* \* \*': 6 fields, not 5"):
        schedule.check_cron("* * * * * *")


def test_deployment_is_created_with_its_cron_schedule(harness, tmp_path):
    dep = schedule.deployment(tmp_path, "0 3 * * 1", ["faster_rcnn"], "weekly", "Europe/Paris")
    dep_id = dep.apply()
    with get_client(sync_client=True) as client:
        stored = client.read_deployment(dep_id)
        flow = client.read_flow(stored.flow_id)
    assert (flow.name, stored.name) == ("rcnnops-retrain", "weekly")
    assert stored.entrypoint == "pipelines.retrain.retrain"
    assert stored.parameters == {
        "project": str(tmp_path.resolve()),
        "variants": ["faster_rcnn"],
        "push_to_remote": True,
    }
    (sched,) = stored.schedules
    assert sched.active and sched.schedule.cron == "0 3 * * 1"
    assert sched.schedule.timezone == "Europe/Paris"
