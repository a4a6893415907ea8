"""A team's services for real, on loopback (issue 19): MLflow on PostgreSQL with
its artifacts proxied to S3, DVC's remote on the same S3. One clone runs the
pipeline; a second clone (other folder, same servers) pulls the models instead
of retraining, sees the champion, compares, and serves it through the MLflow
server's proxied artifacts without S3 credentials of its own."""

from __future__ import annotations

import base64
import json
import os
import subprocess

import pytest

from tests.code.test_scale import _git, _params, _sha


def _team_extras() -> None:
    """`make test-scale` installs them (extras team and team-test)."""
    for module, extra in (("moto", "team-test"), ("psycopg", "team"), ("dvc_s3", "team")):
        pytest.importorskip(module, reason=f"pip install -e '.[{extra}]' (make test-scale does)")


@pytest.mark.scale
def test_two_clones_share_mlflow_on_postgres_and_s3_and_dvc_on_s3(
    harness, tiny_project, tmp_path, monkeypatch, capsys
):
    _team_extras()
    from pipelines.retrain import retrain
    from rcnnops.cli import main
    from rcnnops.serving import process
    from tests.code import team_services as ts
    from tests.code.test_serving import post

    with (
        ts.s3_server(tmp_path) as s3,
        ts.postgres() as pg,
        ts.mlflow_server(tmp_path, pg, "s3://team/mlflow", s3) as url,
    ):
        for k, v in ts.S3_ENV.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3)  # DVC's S3 client (botocore) reads it
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.delenv("RCNNOPS_DVC_REMOTE", raising=False)
        _params(tiny_project, variants=["faster_rcnn"], **{"pipeline.remote": "s3://team/dvc"})
        (tiny_project / ".gitignore").write_text("/data/\n/models/\n/reports/\n")
        _git(tiny_project, "init", "-q", "-b", "main")
        (first,) = retrain(project=str(tiny_project))
        assert first["promoted"] and first["version"] == "1"
        assert not (tiny_project / "mlflow.db").exists()  # all of it went to the server
        _git(tiny_project, "add", "-A")
        _git(tiny_project, "commit", "-qm", "pipeline run")

        import boto3

        keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3)
                .list_objects_v2(Bucket="team")["Contents"]]  # fmt: skip
        assert any(k.startswith("dvc/files/md5/") for k in keys)  # DVC pushed
        assert any(k.startswith("mlflow/") and k.endswith("model.pt") for k in keys)

        clone = tmp_path / "clone"
        _git(tmp_path, "clone", "-q", str(tiny_project), str(clone))
        (second,) = retrain(project=str(clone))
        model = "models/faster_rcnn/model.pt"
        assert _sha(clone / model) == _sha(tiny_project / model)  # pulled from S3
        assert second["version"] == "1"  # the same version: nothing new registered

        monkeypatch.chdir(clone)
        capsys.readouterr()  # the flows' output
        assert main(["compare", "--format", "json"]) == 0
        rows = {r["source"]: r for r in json.loads(capsys.readouterr().out)}
        assert rows["champion"]["version"] == rows["latest"]["version"] == "1"
        assert rows["champion"]["AP"] == rows["latest"]["AP"] >= 0.0  # one model, both views

        # serving in the clone: the model comes through the server's artifact proxy,
        # with no S3 endpoint or credentials in the serving process
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("AWS_") and k != "MLFLOW_S3_ENDPOINT_URL"}  # fmt: skip
        port = process.free_port()
        log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 (closed below)
        server = process.start_server(clone, "faster_rcnn", port, env=env, stdout=log,
                                      stderr=subprocess.STDOUT)  # fmt: skip
        try:
            process.wait_until_up(f"http://127.0.0.1:{port}", server, timeout=180)
            image = sorted((clone / "data/raw/shapes/val").glob("*.png"))[0]
            body = {"dataframe_records": [{"image": base64.b64encode(image.read_bytes()).decode()}]}
            status, headers, answer = post(f"http://127.0.0.1:{port}", body)
            assert status == 200 and answer["model_version"] == "1"
        finally:
            process.stop_server(server)
            log.close()
