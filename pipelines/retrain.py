"""The retraining flow: data versioning -> prepare -> [proposals] -> train -> evaluate ->
register -> promote -> compare.

Reads as an outline of named tasks. File-producing stages run through
``dvc repro`` (DVC decides what is stale and caches outputs); register and
promote make no files and talk to MLflow, so they retry on I/O errors.
Runs on Prefect's ephemeral local API unless ``PREFECT_API_URL`` is set.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.futures import wait

from pipelines import gpus, held_slots
from pipelines import slots as stage_slots
from pipelines import state as run_state
from pipelines.decisions import summary, unchanged
from rcnnops import dvc_launcher
from rcnnops import project as dvcproj
from rcnnops.config import USES_PROPOSALS, Params, load_params
from rcnnops.lock import project_lock


def _chdir(project: str) -> Path:
    path = Path(project).resolve()
    os.chdir(path)  # stages and MLflow's default store are project-relative
    return path


@task(name="ensure-dvc", retries=2, retry_delay_seconds=2)
def ensure_dvc(project: str, remote: str | None) -> list[str]:
    done = dvcproj.ensure_dvc(Path(project), remote)
    for line in done:
        get_run_logger().info(line)
    return done


@task(name="dvc-pull", retries=3, retry_delay_seconds=[2, 5, 10])
def pull(project: str) -> list[str]:
    """Fetch what the remote has of the stale outputs (a teammate's run), then
    return what is still stale."""
    dvcproj.pull(Path(project))
    stale = sorted(dvcproj.status(Path(project)))
    get_run_logger().info("after dvc pull, changed: %s", ", ".join(stale) or "nothing")
    return stale


@task(name="dvc-status")
def pipeline_status(project: str) -> list[str]:
    """Stages DVC reports as changed (one call: cheap no-op reruns)."""
    stale = sorted(dvcproj.status(Path(project)))
    get_run_logger().info("changed: %s", ", ".join(stale) or "nothing (all up to date)")
    return stale


def _needed(stages: list[str], stale: tuple[str, ...] | None, upstream_ran: bool) -> bool:
    """Whether to ask DVC about ``stages`` at all: ``stale`` is what the run's first
    ``dvc status`` reported (None: not known); a stage it did not report can
    only have become stale since if a stage upstream ran."""
    return stale is None or upstream_ran or any(s in stale for s in stages)


def _ran(stages: list[str], ran: list[str]) -> str:
    return "; ".join(f"{s}: {'ran' if s in ran else 'up to date (DVC cache)'}" for s in stages)


@task(name="dvc-repro")
def repro(
    project: str,
    stages: list[str],
    stale: tuple[str, ...] | None = None,
    upstream_ran: bool = False,
) -> list[str]:
    """Run DVC stages, in order, those that are stale (one ``dvc repro``); returns
    the stages that ran."""
    ran = dvcproj.repro(Path(project), stages) if _needed(stages, stale, upstream_ran) else []
    get_run_logger().info(_ran(stages, ran))
    return ran


@task(name="tracking-store", retries=3, retry_delay_seconds=[2, 5, 10])
def tracking_store(project: str, experiment: str) -> str:
    """Create (or migrate) the tracking store and the experiment once, before
    stages that log to it start, possibly several at once; runs beside the data
    stages."""
    from rcnnops import tracking

    tracking.check_reachable(tracking.tracking_uri(Path(project)))
    return tracking.setup(experiment, Path(project))


@task(name="warm-up")
def warm_up() -> None:
    """Load now what the last tasks would load first (a second or two in all), beside
    the data stages and the first training, not between training and registering:
    see :func:`rcnnops.registry.warm_up`. Only an optimisation: the flow waits for it
    before registering, and what fails here is logged; the task that needs it then
    reports the error. This process never loads torch: the evaluate stages checked
    the models as served, which is the one thing registering would load them for."""
    try:
        from rcnnops import registry

        registry.warm_up()
    except Exception as e:  # noqa: BLE001 - see the docstring
        get_run_logger().warning(
            "warm-up: %s: %s (loaded when needed instead)", type(e).__name__, e
        )


@task(name="train-evaluate")
def train_and_evaluate(
    project: str,
    variant: str,
    slots: stage_slots.Slots,
    stale: tuple[str, ...] | None = None,
    upstream_ran: bool = False,
) -> list[str]:
    """``train@<variant>`` then ``evaluate@<variant>`` if stale, holding the
    concurrency slots (see :mod:`pipelines.slots`) and, on GPUs, a lease on the
    GPUs it runs on (:mod:`pipelines.gpus`); returns the stages that ran."""
    stages = [f"train@{variant}", f"evaluate@{variant}"]
    if not _needed(stages, stale, upstream_ran):
        get_run_logger().info(_ran(stages, []))
        return []
    root, env = Path(project), slots.threads()
    with ExitStack() as held:
        held.enter_context(stage_slots.hold(slots, stages[0], get_run_logger()))
        if slots.on_gpu:
            leased = held.enter_context(gpus.lease(slots.gpus_per_stage, stages[0], slots.gpu_ids))
            env["CUDA_VISIBLE_DEVICES"] = ",".join(leased)
            get_run_logger().info("train@%s, evaluate@%s on GPU %s", variant, variant, leased)
        ran = dvcproj.repro(root, stages, extra_env=env)
    get_run_logger().info(_ran(stages, ran))
    return ran


@task(name="version-data")
def version_data(project: str, params: Params, stale: tuple[str, ...] | None = None) -> dict:
    """Generate the default dataset if it is the source, then validate and
    version it with `prepare` (one ``dvc repro``); returns the data hashes every
    run records and the stages that ran."""
    root = Path(project)
    stages = ["prepare"]
    if Path(params.data.root).resolve() == (root / params.generate.out).resolve():
        stages.insert(0, "generate")
    ran = dvcproj.repro(root, stages) if _needed(stages, stale, False) else []
    from rcnnops.data.prepare import load_manifest

    m = load_manifest(root / params.prepare.out)
    get_run_logger().info(
        "%s; data_hash %s (val %s)", _ran(stages, ran), m["data_hash"][:12], m["val_hash"][:12]
    )
    return {"data_hash": m["data_hash"], "val_hash": m["val_hash"], "ran": ran}


@task(name="register", retries=3, retry_delay_seconds=[2, 5, 10])
def register(params: Params, variant: str) -> dict:
    from rcnnops import registry, tracking

    tracking.check_reachable()  # a clear message (and a retry) when the server is gone
    with tracking.unreachable_explained():
        r = registry.register_variant(params, variant)
    get_run_logger().info(
        "%s version %s (%s)", r.name, r.version, "new" if r.created else "already registered"
    )
    if r.trained_in_run:
        get_run_logger().info(
            "%s: its training run %s is in another tracking store (a model pulled with "
            "DVC); logged in a run made for it here, which names that run",
            r.name,
            r.trained_in_run,
        )
    return {"name": r.name, "version": r.version, "created": r.created, "decided": r.decided}


@task(name="promote", retries=3, retry_delay_seconds=[2, 5, 10])
def promote(params: Params, variant: str, version: str) -> dict:
    from prefect.runtime import flow_run

    from rcnnops import registry, tracking

    tracking.check_reachable()
    actor = f"prefect flow run {flow_run.get_name() or flow_run.get_id()}"
    with tracking.unreachable_explained():
        d = registry.promote_variant(params, variant, version, actor=actor)
    get_run_logger().info(
        "%s v%s: %s (%s)",
        d.name,
        d.version,
        "promoted to champion" if d.promoted else "champion kept",
        d.reason,
    )
    return registry.decision_dict(d)


@task(name="compare-picture", retries=2, retry_delay_seconds=[2, 5])
def compare_picture(project: str, variants: list[str]) -> str | None:
    """reports/compare/side_by_side.png (the variants' predictions side by side), drawn
    in a process of its own beside the registry's work; its path, or None when no
    variant has predictions."""
    from rcnnops import compare as cmp

    drawn = cmp.side_by_side_in_a_process(Path(project) / "params.yaml", variants)
    return None if drawn is None else str(drawn)


@task(name="compare", retries=2, retry_delay_seconds=[2, 5])
def compare(p: Params, variants: list[str], picture: str | None) -> str:
    """The variants' comparison (latest run and champion) as Markdown, with the
    ``picture`` (:func:`compare_picture`'s); logs both to MLflow when they changed."""
    from rcnnops import compare as cmp

    rows = cmp.collect(p, variants)
    plot = None if picture is None else Path(picture)
    run_id = cmp.log_to_mlflow(p.register.experiment, rows, plot)
    get_run_logger().info(
        "comparison: %d row(s), picture %s, MLflow %s",
        len(rows),
        plot or "none (no predictions)",
        f"run {run_id}" if run_id else "unchanged (not logged again)",
    )
    note = f"\n\nPredictions side by side: `{plot}`" if plot else ""
    return cmp.render(rows, "markdown") + note


@task(name="dvc-push", retries=3, retry_delay_seconds=[2, 5, 10])
def push(project: str) -> None:
    dvcproj.dvc(Path(project), "push", "-q")


@flow(name="rcnnops-retrain", log_prints=True)
def retrain(
    project: str = ".", variants: list[str] | None = None, push_to_remote: bool = True
) -> list[dict]:
    """Retrain, evaluate, register and promote ``variants`` (default: params.yaml's).

    Holds the project's run lock throughout: a second run refuses at once."""
    root = _chdir(project)
    # The DVC launcher: the run's `dvc repro`s and push are forks of one process
    # that imported DVC once (see rcnnops.dvc_launcher)
    with (
        project_lock(root),
        dvc_launcher.running(dvcproj.env()),
        held_slots.waits_end_with_the_run(),  # Ctrl-C stops stages waiting for slots too
    ):
        return _retrain(root, variants, push_to_remote)


def _retrain(root: Path, variants: list[str] | None, push_to_remote: bool) -> list[dict]:
    params = load_params(root / "params.yaml")
    variants = variants or params.variants
    remote = run_state.dvc_remote(params)
    ensure_dvc(str(root), remote)
    stale = pipeline_status(str(root))
    if stale and params.pipeline.pull and (root / "dvc.lock").is_file():
        stale = pull(str(root))
    known = tuple(stale)
    slots = stage_slots.plan(params.pipeline.parallel, params.train.device, params.train.nproc)
    with ExitStack() as reserved:
        # While the data stages run (none logs to MLflow or takes a stage slot): the
        # tracking store is made (a new SQLite file costs seconds of migrations), the
        # first training's stage slots are taken, and the registry's modules load
        # (not awaited before training: a run without proposals has no time to spare).
        store = tracking_store.submit(str(root), params.register.experiment) if stale else None
        warm = warm_up.submit() if stale else None
        first = reserved.enter_context(stage_slots.reserve(slots)) if stale else None
        upstream = version_data(str(root), params, known)["ran"]
        if USES_PROPOSALS & set(variants):
            upstream += repro(str(root), ["proposals"], known, bool(upstream))
        if store is not None and first is not None:
            first.result()  # the limits' error, if preparing them failed
            store.result()  # its error (after its retries), if it failed
        trained = {
            v: train_and_evaluate.submit(str(root), v, slots, known, bool(upstream))
            for v in variants
        }
        wait(list(trained.values()))
    failed = [v for v, f in trained.items() if not f.state.is_completed()]
    if failed:  # nothing is registered unless every variant trained and evaluated
        raise RuntimeError(
            f"training or evaluation failed for {', '.join(failed)}; nothing was registered "
            "or promoted (see the task logs above; rerun resumes from the last checkpoint)"
        )
    # DVC's push of the outputs runs beside the registry's work (neither touches
    # what the other reads or writes), and so does the drawing of the comparison's
    # picture, in a process of its own; the run waits for both before finishing.
    pushed = push.submit(str(root)) if push_to_remote else None
    picture = compare_picture.submit(str(root), variants)  # and the comparison's picture
    if warm is not None:
        warm.wait()  # done long ago unless training was short
    decisions = []
    for v in variants:
        reg = register(params, v)
        if reg["created"] or not reg["decided"]:  # also a version an earlier run left undecided
            decisions.append(promote(params, v, reg["version"]))
        else:
            decisions.append(unchanged(reg))
    create_markdown_artifact(
        summary(decisions),
        key="rcnnops-promotion",
        description="Promotion decisions of this retraining run",
    )
    create_markdown_artifact(
        compare(params, variants, picture),
        key="rcnnops-compare",
        description="Variants compared: latest run and champion (metrics, cost, lineage)",
    )
    if pushed is not None:
        pushed.result()  # its error (after its retries), if it failed
    from prefect.runtime import flow_run

    run_state.record(root, variants, remote, push_to_remote, decisions, flow_run.get_name() or "")
    return decisions
