"""The servers a team runs, started for a test on 127.0.0.1 and always stopped:
an S3-compatible store (moto's server: one pip package, runs as a process, no
account or disk layout to prepare, unlike MinIO's binary, which PyPI does not
carry), a throw-away PostgreSQL 15 cluster (initdb in a temporary folder), and
`mlflow server` on PostgreSQL with its artifacts proxied to S3."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rcnnops.serving.process import free_port, stop_server

S3_ENV = {  # moto accepts any credentials; the region must be a real one
    "AWS_ACCESS_KEY_ID": "rcnnops-test",
    "AWS_SECRET_ACCESS_KEY": "rcnnops-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Until ``url`` answers (any HTTP status); the log's tail if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # answering
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def spawn(cmd: list[str], env: dict | None, log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """``cmd`` in a process group of its own, output appended to ``log``."""
    out = open(log, "ab")  # noqa: SIM115 (the child holds it)
    try:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)  # fmt: skip
    finally:
        out.close()


@contextmanager
def s3_server(workdir: Path, bucket: str = "team") -> Iterator[str]:
    """moto's S3 server with ``bucket``; yields its endpoint URL."""
    import boto3

    port = free_port()
    log = workdir / "s3.log"
    proc = spawn(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], None, log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/", proc, log)
        boto3.client("s3", endpoint_url=url, **_boto(S3_ENV)).create_bucket(Bucket=bucket)
        yield url
    finally:
        stop_server(proc)


def _boto(env: dict) -> dict:
    return {"aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
            "region_name": env["AWS_DEFAULT_REGION"]}  # fmt: skip


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the postgres user."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


@contextmanager
def postgres() -> Iterator[str]:
    """A fresh cluster on 127.0.0.1 (trust auth, socket in its own folder); yields
    ``postgresql://postgres@127.0.0.1:PORT/mlflow``. Stopped and deleted after."""
    for tool in ("initdb", "pg_ctl"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not on PATH: PostgreSQL 15 is needed for this test")
    root = Path(tempfile.mkdtemp(prefix="rcnnops-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", free_port()
    subprocess.run(_as_postgres(["initdb", "-D", str(data), "-U", "postgres", "-A", "trust"]),
                   check=True, capture_output=True)  # fmt: skip
    options = f"-h 127.0.0.1 -p {port} -k {root}"
    subprocess.run(_as_postgres(["pg_ctl", "-D", str(data), "-o", options, "-l",
                                 str(root / "pg.log"), "-w", "start"]),
                   check=True, capture_output=True)  # fmt: skip
    try:
        createdb = ["createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow"]
        subprocess.run(_as_postgres(createdb), check=True, capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(_as_postgres(["pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop"]),
                       capture_output=True)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def mlflow_server(workdir: Path, backend: str, artifacts: str, s3_endpoint: str) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 with ``backend`` and artifacts proxied to
    ``artifacts`` (``s3://...`` on ``s3_endpoint``); yields its URL."""
    port = free_port()
    env = {**os.environ, **S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
           "--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]  # fmt: skip
    log = workdir / "mlflow-server.log"
    proc = spawn(cmd, env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc, log, timeout=180)
        yield url
    finally:
        stop_server(proc)
