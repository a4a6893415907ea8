"""One scrubber for URLs and secrets in everything logged or stored."""

import json

from rcnnops import tracking
from rcnnops.redact import REDACTED, redact


def test_credentials_in_urls_are_removed(monkeypatch):
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    cases = {
        "https://KEY:secret@host/dvc": f"https://{REDACTED}@host/dvc",
        "postgresql://mlflow:pw123@db:5432/mlflow": f"postgresql://{REDACTED}@db:5432/mlflow",
        "s3://bucket/x?access_key=AKIA1&region=eu": f"s3://bucket/x?access_key={REDACTED}&region=eu",
        "https://h/o?X-Amz-Signature=abc&X-Amz-Date=1": (
            f"https://h/o?X-Amz-Signature={REDACTED}&X-Amz-Date=1"
        ),
        "remote -> s3://team-bucket/rcnnops": "remote -> s3://team-bucket/rcnnops",
        "sqlite:////home/me/project/mlflow.db": "sqlite:////home/me/project/mlflow.db",
        "user@example.com wrote": "user@example.com wrote",  # not a URL
    }
    for text, expected in cases.items():
        assert redact(text) == expected, text


def test_secret_environment_values_are_removed(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI")
    assert redact("failed with key wJalrXUtnFEMI") == f"failed with key {REDACTED}"
    tags = tracking.scrub({"remote": "s3://b/x?token=abcdef", "uri": "https://u:p@h", "n": 3})
    assert tags == {"remote": REDACTED, "uri": REDACTED, "n": 3}


def test_remote_credentials_never_reach_the_run_state(tmp_path, monkeypatch):
    from pipelines import state

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://admin:hunter22@mlflow.internal")
    (tmp_path / "params.yaml").write_text("variants: [rcnn]\n")
    state.record(tmp_path, ["rcnn"], "https://KEY:s3cr3t@dvc.internal/store", True, [])
    text = (tmp_path / state.STATE).read_text()
    assert "s3cr3t" not in text and "hunter22" not in text and "KEY" not in text
    doc = json.loads(text)
    assert doc["remote"] == f"https://{REDACTED}@dvc.internal/store"
    assert doc["tracking_uri"] == f"https://{REDACTED}@mlflow.internal"


def test_dvc_remote_credentials_are_not_logged(tmp_path):
    from rcnnops import project

    done = project.ensure_dvc(tmp_path, "https://KEY:s3cr3t@dvc.internal/store")
    assert any("dvc.internal" in line for line in done)
    assert not any("s3cr3t" in line or "KEY" in line for line in done)
