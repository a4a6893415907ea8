"""MLflow run and metric logging for the stages (MLflow importers: this, registry/, store_template).

The tracking store is ``MLFLOW_TRACKING_URI`` when set, else a SQLite file
``mlflow.db`` in the project (the current directory), with artifacts in
``mlartifacts/`` beside it. Nothing here needs a server.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from rcnnops import store_template
from rcnnops.errors import UserError
from rcnnops.redact import REDACTED, SECRET_NAME, redact

DEFAULT_DB = "mlflow.db"
# MLflow 3's UI opens an experiment by its kind: training runs, not GenAI traces.
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
DEFAULT_ARTIFACTS = "mlartifacts"

# Values of these never reach MLflow params or tags (tokens, keys, passwords).
_SECRET = SECRET_NAME


def tracking_uri(project: Path | None = None) -> str:
    """The tracking URI in force: the environment's, or the project's SQLite file."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    project = Path(project or Path.cwd()).resolve()
    return f"sqlite:///{project / DEFAULT_DB}"


class TrackingUnavailable(UserError, RuntimeError):
    """The MLflow tracking server does not answer (local outputs are unaffected)."""


RERUN = (
    "models/ and reports/ are kept: rerun (`rcnnops run`) once it is back, and the run "
    "registers without retraining"
)


def check_reachable(uri: str | None = None, timeout: float = 5.0, then: str = RERUN) -> None:
    """For an HTTP tracking URI, make sure the server answers ``/health``; raise
    :class:`TrackingUnavailable` saying so and ``then`` (what to do) otherwise.
    Local stores (SQLite, files) always pass. A quick probe: MLflow's own client
    retries a server that is down for minutes before it fails."""
    import urllib.error
    import urllib.request

    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # it answered (behind a proxy or auth): reachable
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingUnavailable(
            f"the MLflow tracking server {redact(uri)} does not answer ({reason}); {then}"
        ) from None


@contextmanager
def unreachable_explained(then: str = RERUN) -> Iterator[None]:
    """Turn an error from a tracking server that went away mid-call into
    :class:`TrackingUnavailable` (other errors pass through unchanged)."""
    try:
        yield
    except TrackingUnavailable:
        raise
    except Exception:
        check_reachable(then=then)
        raise


_checked: set[Path] = set()  # projects whose store was checked for a move


def setup(experiment: str, project: Path | None = None) -> str:
    """Point MLflow at the store and make ``experiment`` active; returns its id."""
    project = Path(project or Path.cwd()).resolve()
    uri = tracking_uri(project)
    _point_mlflow_at(uri)
    if uri == f"sqlite:///{project / DEFAULT_DB}" and project not in _checked:
        from rcnnops.relocate import warn_if_elsewhere

        _checked.add(project)
        warn_if_elsewhere(project, DEFAULT_DB, DEFAULT_ARTIFACTS)
    store_template.start_from_template(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        location = None
        if uri.startswith("sqlite:"):
            location = (project / DEFAULT_ARTIFACTS).as_uri()
        exp_id = mlflow.create_experiment(
            experiment, artifact_location=location, tags={KIND_TAG: KIND}
        )
    else:
        exp_id = exp.experiment_id
        if exp.tags.get(KIND_TAG) != KIND:  # made before rcnnops tagged its kind
            client().set_experiment_tag(exp_id, KIND_TAG, KIND)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def _point_mlflow_at(uri: str) -> None:
    """Point this process's MLflow (tracking and registry) at ``uri`` without
    leaving it in the environment. MLflow exports the URIs it is given
    (``MLFLOW_TRACKING_URI``, ``MLFLOW_REGISTRY_URI``) for child processes, and
    :func:`tracking_uri` reads that variable as the user's choice: one project's
    store would then become the store of every project set up after it in the
    process (and of their child processes). A variable the user set is kept."""
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    before = {name: os.environ.get(name) for name in names}
    try:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def ui_hint(experiment: str, project: Path | None = None) -> str:
    """Where to look at the runs in the MLflow UI. Its experiment page opens on
    the GenAI overview unless the browser chose "Model training" (a switch it
    remembers); the link chooses it (``workflowType=machine_learning``)."""
    uri = tracking_uri(project)
    exp = mlflow.get_experiment_by_name(experiment)
    page = f"#/experiments/{exp.experiment_id}?workflowType=machine_learning" if exp else "#/"
    if uri.startswith(("http://", "https://")):
        return f"MLflow UI: {redact(uri.rstrip('/'))}/{page}"
    return (f"MLflow UI: `mlflow ui --backend-store-uri {uri}`, then "
            f"http://127.0.0.1:5000/{page}")  # fmt: skip


def client() -> MlflowClient:
    return MlflowClient(
        tracking_uri=mlflow.get_tracking_uri(), registry_uri=mlflow.get_registry_uri()
    )


def git_commit(project: Path | None = None) -> str:
    """The project's git commit (``-dirty`` suffix if modified), or ``unknown``."""
    cwd = Path(project or Path.cwd())
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty.strip() else "")


def scrub(values: dict[str, Any]) -> dict[str, Any]:
    """Drop entries whose key looks like a secret; values that hold one (the value
    of a secret-looking environment variable, credentials in a URL) become
    :data:`REDACTED`: MLflow keeps params and tags forever. See :mod:`rcnnops.redact`."""
    return {
        k: REDACTED if isinstance(v, str) and redact(v) != v else _env_checked(v)
        for k, v in values.items()
        if not _SECRET.search(k)
    }


def _env_checked(value: Any) -> Any:
    """Non-string values holding an environment secret (as text) are redacted too."""
    return REDACTED if not isinstance(value, str) and redact(str(value)) != str(value) else value


@contextmanager
def stage_run(
    experiment: str,
    run_name: str,
    run_id: str | None = None,
    tags: dict[str, str] | None = None,
    project: Path | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start a run, or resume ``run_id`` (training resumed from a checkpoint, or
    the evaluate stage adding to the run that trained the model)."""
    setup(experiment, project)
    if run_id is not None:
        with mlflow.start_run(run_id=run_id) as run:
            yield run
        return
    with mlflow.start_run(run_name=run_name, tags=scrub(tags or {})) as run:
        yield run


def find_run(run_id: str | None) -> Any | None:
    """Run ``run_id`` in the store in force, or None when this store has no such
    run (a model trained against another store, pulled with DVC)."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        return client().get_run(run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


@contextmanager
def added_to(run_id: str) -> Iterator[mlflow.ActiveRun]:
    """Add to a run that has ended (the model logged into its training run at
    registration) and leave its status and end time as they were. MLflow's
    ``start_run(run_id=...)`` would end it again on leaving, so the UI's duration
    would run from training to registration, and mark a trained run FAILED if
    only the addition failed. A run that has not ended is left to MLflow."""
    before = client().get_run(run_id).info
    try:
        with mlflow.start_run(run_id=run_id) as run:
            yield run
    finally:
        if before.end_time is not None:
            client().set_terminated(run_id, status=before.status, end_time=before.end_time)


def log_datasets(datasets: list[tuple[str, str, str, str]]) -> None:
    """Log ``(name, path, digest, context)`` datasets as inputs of the active run:
    the source is the DVC-tracked path, the digest its content hash, so the UI's
    dataset column ties a run to the exact data."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    for name, path, digest, context in datasets:
        source = LocalArtifactDatasetSource(path)
        dataset = MetaDataset(source, name=name, digest=digest[:32])
        _log_input(dataset, context)


# How SQLite, PostgreSQL and MySQL word a unique key's violation.
_DUPLICATE = ("unique constraint", "duplicate key", "duplicate entry")


def _log_input(dataset, context: str, tries: int = 3) -> None:
    """``mlflow.log_input``, again if another run logged the same new dataset at
    the same moment. MLflow's SQL store looks the dataset up, then inserts it: two
    variants trained at once on the same data both insert, and one fails on the
    table's unique key (seen as a failed ``train@mask_rcnn`` beside
    ``train@faster_rcnn``). The dataset then exists, and logging again links it."""
    from mlflow.exceptions import MlflowException

    for attempt in range(1, tries + 1):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except MlflowException as e:
            text = str(e).lower()
            raced = any(s in text for s in _DUPLICATE)
            if not raced or attempt == tries:
                raise
            time.sleep(0.05 * attempt)


def log_params(params: dict[str, Any]) -> None:
    """Log params (flat dict), skipping secrets and keys already logged."""
    run = mlflow.active_run()
    if run is None:
        return
    existing = mlflow.get_run(run.info.run_id).data.params
    fresh = {k: v for k, v in scrub(params).items() if k not in existing}
    if fresh:
        mlflow.log_params({k: str(v)[:6000] for k, v in fresh.items()})


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log numeric metrics to the active run, if any (one batched call)."""
    if mlflow.active_run() is None:
        return
    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    if clean:
        mlflow.log_metrics(clean, step=step)


def last_steps(run_id: str) -> dict[str, int]:
    """The highest step logged so far for each metric of ``run_id`` (a resumed
    training skips what its killed predecessor already logged)."""
    c = client()
    keys = c.get_run(run_id).data.metrics
    return {k: max((m.step for m in c.get_metric_history(run_id, k)), default=-1) for k in keys}


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    if mlflow.active_run() is not None and Path(path).exists():
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def set_tags(tags: dict[str, str]) -> None:
    if mlflow.active_run() is not None:
        mlflow.set_tags(scrub(tags))


def active_run_id() -> str | None:
    run = mlflow.active_run()
    return run.info.run_id if run else None


def unlogged(
    metrics: dict[str, float], step: int | None, done: Mapping[str, int]
) -> dict[str, float]:
    """The entries of ``metrics`` that the MLflow run does not hold yet at ``step``.

    ``done`` maps each key to the highest step already logged (``step`` None
    counts as 0, as in MLflow). A run resumed from its epoch-e checkpoint replays
    the steps logged between that checkpoint and the kill; MLflow's history is
    append-only, so they are skipped rather than logged twice (on CPU with a
    fixed seed the replayed values are the same numbers; on CUDA they may differ
    in the last bits, and the history keeps the first).
    """
    at = 0 if step is None else step
    return {k: v for k, v in metrics.items() if at > done.get(k, -1)}


def metric_logger(done: Mapping[str, int]) -> Callable[[dict[str, float], int | None], None]:
    """The training loop's ``log`` for an MLflow run that already holds ``done``
    (:func:`unlogged`): one synchronous batched call per logged step, so every
    step logged before a checkpoint is stored when the checkpoint is written.
    (MLflow's asynchronous logging was tried: its flush before each checkpoint
    waited up to a second, more than all the synchronous calls of an epoch.)"""

    def log(metrics: dict[str, float], step: int | None = None) -> None:
        log_metrics(unlogged(metrics, step, done), step)

    return log
