"""The retraining flow: data versioning -> prepare -> [proposals] -> train -> evaluate ->
register -> promote -> compare.

Reads as an outline of named tasks. File-producing stages run through
``dvc repro`` (DVC decides what is stale and caches outputs); register and
promote make no files and talk to MLflow, so they retry on I/O errors.
Runs on Prefect's ephemeral local API unless ``PREFECT_API_URL`` is set.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from rcnnops import project as dvcproj
from rcnnops.config import USES_PROPOSALS, load_params


def _chdir(project: str) -> Path:
    path = Path(project).resolve()
    os.chdir(path)  # stages and MLflow's default store are project-relative
    return path


@task(name="ensure-dvc", retries=2, retry_delay_seconds=2)
def ensure_dvc(project: str) -> list[str]:
    done = dvcproj.ensure_dvc(Path(project))
    for line in done:
        get_run_logger().info(line)
    return done


@task(name="dvc-status")
def pipeline_status(project: str) -> list[str]:
    """Stages DVC reports as changed (one call: cheap no-op reruns)."""
    stale = sorted(dvcproj.status(Path(project)))
    get_run_logger().info("changed: %s", ", ".join(stale) or "nothing (all up to date)")
    return stale


@task(name="dvc-repro")
def repro(project: str, stage: str, pipeline_fresh: bool = False) -> bool:
    """Run one DVC stage if stale; True when it ran."""
    if pipeline_fresh:
        get_run_logger().info("%s: up to date (DVC cache)", stage)
        return False
    ran = dvcproj.repro(Path(project), stage)
    get_run_logger().info("%s: %s", stage, "ran" if ran else "up to date (DVC cache)")
    return ran


@task(name="version-data")
def version_data(project: str, pipeline_fresh: bool = False) -> dict:
    """Generate the default dataset if it is the source, then validate and
    version it with `prepare`; returns the data hashes every run records."""
    p = load_params(Path(project) / "params.yaml")
    if not pipeline_fresh:
        if Path(p.data.root).resolve() == (Path(project) / p.generate.out).resolve():
            dvcproj.repro(Path(project), "generate")
        dvcproj.repro(Path(project), "prepare")
    from rcnnops.data.prepare import load_manifest

    m = load_manifest(Path(project) / p.prepare.out)
    get_run_logger().info("data_hash %s (val %s)", m["data_hash"][:12], m["val_hash"][:12])
    return {"data_hash": m["data_hash"], "val_hash": m["val_hash"]}


@task(name="register", retries=3, retry_delay_seconds=[2, 5, 10])
def register(project: str, variant: str) -> dict:
    from rcnnops import registry

    p = load_params(Path(project) / "params.yaml")
    proposals = None
    if variant in USES_PROPOSALS:  # the served model runs selective search as trained
        from rcnnops.proposals.precompute import settings_from

        proposals = settings_from(p).as_dict()
    r = registry.register(
        variant,
        Path(p.train.out) / variant,
        Path(p.evaluate.out) / variant,
        p.register.experiment,
        proposals=proposals,
    )
    get_run_logger().info(
        "%s version %s (%s)", r.name, r.version, "new" if r.created else "already registered"
    )
    return {"name": r.name, "version": r.version, "created": r.created}


@task(name="promote", retries=3, retry_delay_seconds=[2, 5, 10])
def promote(project: str, variant: str, version: str) -> dict:
    from prefect.runtime import flow_run

    from rcnnops import registry

    p = load_params(Path(project) / "params.yaml")
    actor = f"prefect flow run {flow_run.get_name() or flow_run.get_id()}"
    d = registry.promote(
        variant,
        version,
        p.register.metric_for(variant),
        p.register.min_improvement,
        actor=actor,
        experiment=p.register.experiment,
    )
    get_run_logger().info(
        "%s v%s: %s (%s)",
        d.name,
        d.version,
        "promoted to champion" if d.promoted else "champion kept",
        d.reason,
    )
    return registry.decision_dict(d)


def unchanged(reg: dict) -> dict:
    """No new model version, so no new decision (the audit trail stays as it was)."""
    return {
        "name": reg["name"],
        "version": reg["version"],
        "promoted": False,
        "reason": "model unchanged since its registration; no new decision",
        "metric": None,
        "value": None,
        "champion_before": None,
        "champion_value": None,
    }


@task(name="compare", retries=2, retry_delay_seconds=[2, 5])
def compare(project: str, variants: list[str]) -> str:
    """The variants' comparison (latest run and champion) as Markdown; also draws
    reports/compare/side_by_side.png and logs both to MLflow when they changed."""
    from rcnnops import compare as cmp

    p = load_params(Path(project) / "params.yaml")
    rows = cmp.collect(p, variants)
    plot = cmp.side_by_side(p, variants)
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


def _summary(decisions: list[dict]) -> str:
    rows = ["| model | version | decision | metric | value | reason |", "|---|---|---|---|---|---|"]
    for d in decisions:
        value = "n/a" if d["value"] is None else f"{d['value']:.4f}"
        metric = d["metric"] or "-"
        rows.append(
            f"| {d['name']} | {d['version']} | "
            f"{'promoted' if d['promoted'] else 'kept'} | {metric} | {value} | "
            f"{d['reason']} |"
        )
    return "\n".join(rows)


@flow(name="rcnnops-retrain", log_prints=True)
def retrain(
    project: str = ".", variants: list[str] | None = None, push_to_remote: bool = True
) -> list[dict]:
    """Retrain, evaluate, register and promote ``variants`` (default: params.yaml's)."""
    root = _chdir(project)
    params = load_params(root / "params.yaml")
    variants = variants or params.variants
    ensure_dvc(str(root))
    fresh = not pipeline_status(str(root))
    version_data(str(root), fresh)
    if USES_PROPOSALS & set(variants):
        repro(str(root), "proposals", fresh)
    decisions = []
    for v in variants:
        repro(str(root), f"train@{v}", fresh)
        repro(str(root), f"evaluate@{v}", fresh)
        reg = register(str(root), v)
        if reg["created"]:
            decisions.append(promote(str(root), v, reg["version"]))
        else:
            decisions.append(unchanged(reg))
    if push_to_remote:
        push(str(root))
    create_markdown_artifact(
        _summary(decisions),
        key="rcnnops-promotion",
        description="Promotion decisions of this retraining run",
    )
    create_markdown_artifact(
        compare(str(root), variants),
        key="rcnnops-compare",
        description="Variants compared: latest run and champion (metrics, cost, lineage)",
    )
    return decisions
