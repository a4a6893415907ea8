"""What the last successful flow run left, and whether another run would change anything.

``rcnnops run`` asks :func:`check` before it starts Prefect. When params.yaml
and dvc.lock are byte for byte as the last successful run left them, DVC
reports nothing stale, and the model versions that run registered are still in
the registry with their promotion decisions, a new run would train, evaluate,
register, promote and push nothing. The command then says so in a few seconds
instead of starting the orchestrator for nothing (``rcnnops run --force`` runs
the flow anyway). Runs started by a Prefect deployment always run the flow.

No Prefect import here: the point is not to pay for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rcnnops.files import sha256_file

STATE = Path(".rcnnops") / "last_run.json"
REMOTE_ENV = "RCNNOPS_DVC_REMOTE"  # overrides params.yaml's pipeline.remote


def dvc_remote(params) -> str | None:
    """The DVC remote a run pulls from and pushes to: ``$RCNNOPS_DVC_REMOTE``,
    else params.yaml's ``pipeline.remote``."""
    return os.environ.get(REMOTE_ENV) or params.pipeline.remote


def _sha(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


def fingerprint(root: Path, variants: list[str], remote: str | None, push: bool) -> dict:
    """Everything a run's outcome depends on besides the files DVC checks."""
    from rcnnops import tracking
    from rcnnops.redact import redact

    # Stored in .rcnnops/last_run.json: URLs without their credentials (a changed
    # password is not a changed remote).
    return {
        "params": _sha(root / "params.yaml"),
        "dvc_lock": _sha(root / "dvc.lock"),
        "variants": sorted(variants),
        "tracking_uri": redact(tracking.tracking_uri(root)),
        "remote": redact(remote) if (push and remote) else None,
    }


def record(
    root: Path,
    variants: list[str],
    remote: str | None,
    push: bool,
    decisions: list[dict],
    flow_run: str = "",
) -> None:
    """Write the state of a run that finished successfully (atomically)."""
    doc = fingerprint(root, variants, remote, push) | {
        "models": {d["name"]: str(d["version"]) for d in decisions},
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "flow_run": flow_run,
    }
    path = root / STATE
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, path)


def _registry_intact(uri: str, models: dict[str, str]) -> bool:
    from rcnnops import tracking

    if uri.startswith(("http://", "https://")):
        try:
            tracking.check_reachable(uri, timeout=3.0)
        except tracking.TrackingUnavailable:
            return False  # let the flow retry and explain
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for name, version in models.items():
        try:
            mv = client.get_model_version(name, version)
        except MlflowException:
            return False
        if (mv.tags or {}).get("promotion.decision") not in ("promoted", "kept"):
            return False  # undecided, or a promotion interrupted before champion moved
    return True


def check(root: Path, variants: list[str], remote: str | None, push: bool) -> str | None:
    """A one-line explanation when a run would change nothing; None when the
    flow has work to do (or it cannot tell)."""
    from rcnnops import project, tracking

    root = Path(root).resolve()
    try:
        last = json.loads((root / STATE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(last, dict) or not isinstance(last.get("models"), dict):
        return None
    # `dvc status` (an output deleted or edited since, a source file changed)
    # runs while MLflow is imported and the registry read: each takes seconds.
    status = subprocess.Popen(
        [sys.executable, "-m", "dvc", "status", "--json"],
        cwd=root,
        env=project.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        now = fingerprint(root, variants, remote, push)
        same = all(last.get(k) == v for k, v in now.items())
        same = same and _registry_intact(tracking.tracking_uri(root), last["models"])
        out = status.communicate(timeout=300)[0] if same else ""
    finally:
        if status.poll() is None:
            status.kill()
            status.wait()
    if not same or status.returncode != 0:
        return None
    try:
        if json.loads(out or "{}"):
            return None
    except ValueError:
        return None
    models = last["models"]
    listed = ", ".join(f"{name} v{version}" for name, version in models.items())
    return (
        f"up to date: params, data and models are as the flow run of {last.get('finished')} "
        f"left them ({listed}); nothing to train, register, promote or push "
        "(`rcnnops run --force` runs the flow anyway)"
    )
