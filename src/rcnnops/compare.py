"""Comparing variants: a table of metrics, cost and lineage, and one picture.

Per variant two rows: ``latest`` (the project's current ``models/<variant>/model.json``
and ``reports/<variant>/metrics.json``, i.e. what the last run trained and
evaluated) and ``champion`` (the registry's ``rcnnops-<variant>@champion``: its
``metric.*`` and lineage tags). The same metrics files stay DVC metrics, so
``dvc metrics diff`` compares them across commits.

The picture (``reports/compare/side_by_side.png``) puts the ground truth and every
evaluated variant's predictions (``reports/<variant>/predictions.json``) side by
side on the same few validation images. The flow logs both to MLflow as one small
run in the experiment ``<register.experiment>-compare`` (only when they changed).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tempfile
from pathlib import Path
from typing import Any

from rcnnops.errors import UserError

METRICS = {
    "AP": "bbox_AP",
    "AP50": "bbox_AP50",
    "AP75": "bbox_AP75",
    "APs": "bbox_APs",
    "APm": "bbox_APm",
    "APl": "bbox_APl",
    "segm_AP": "segm_AP",
}
COLUMNS = (
    ("variant", "source", "version")
    + tuple(METRICS)
    + ("train_s", "infer_ms", "parameters", "data_hash", "run_id")
)
TABLE_COLUMNS = COLUMNS[:-1]  # run ids are long: csv and json only
FORMATS = ("table", "markdown", "csv", "json")
PLOT = Path("compare") / "side_by_side.png"


def _number(value: Any) -> float | None:
    """A metric as a float; None for missing values and COCOeval's -1 ("undefined")."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return None if v != v or v == -1.0 else v


def _int(value: Any) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def read_report(path: Path, kind: type) -> Any:
    """A JSON report a stage wrote (``model.json``, ``metrics.json``: an object;
    ``predictions.json``: a list); a damaged one is a :class:`DataError` naming it."""
    from rcnnops.data.io import DataError, read_json

    value = read_json(path)
    if not isinstance(value, kind):
        expected = "an object" if kind is dict else "a list"
        raise DataError(
            f"{path}: expected {expected}, found {type(value).__name__}; "
            "rerun the stage that writes it (`dvc repro`)"
        )
    return value


def latest_row(variant: str, models: Path, reports: Path) -> dict | None:
    """The project's latest trained + evaluated model of ``variant`` (None if not trained)."""
    meta_path, metrics_path = models / variant / "model.json", reports / variant / "metrics.json"
    if not meta_path.is_file():
        return None
    meta = read_report(meta_path, dict)
    metrics = read_report(metrics_path, dict) if metrics_path.is_file() else {}
    return {
        "variant": variant,
        "source": "latest",
        "version": None,
        **{col: _number(metrics.get(key)) for col, key in METRICS.items()},
        "train_s": _number(meta.get("train_seconds")),
        "infer_ms": _number(metrics.get("infer_ms_per_image")),
        "parameters": _int(meta.get("parameters")),
        "data_hash": meta.get("data_hash"),
        "run_id": meta.get("run_id"),
    }


def champion_row(variant: str, mv: Any) -> dict:
    """The registry champion ``mv`` (an MLflow ModelVersion) of ``variant``."""
    from rcnnops import registry

    tags = mv.tags
    run_id = mv.run_id or tags.get("run_id")
    train_s = _number(tags.get("train_seconds")) or registry.run_metric(run_id, "train_seconds")
    return {
        "variant": variant,
        "source": "champion",
        "version": str(mv.version),
        **{col: _number(registry.metric_value(mv, key)) for col, key in METRICS.items()},
        "train_s": _number(train_s),
        "infer_ms": registry.metric_value(mv, "infer_ms_per_image"),
        "parameters": _int(tags.get("parameters")),
        "data_hash": tags.get("data_hash"),
        "run_id": run_id,
    }


def _registered_version(variant: str, models: Path) -> str | None:
    """The registered version holding the project's current weights, if any."""
    from rcnnops import registry
    from rcnnops.files import sha256_file

    weights = models / variant / "model.pt"
    if not weights.is_file():
        return None
    mv = registry.version_with_hash(registry.model_name(variant), sha256_file(weights))
    return None if mv is None else str(mv.version)


def collect(params: Any, variants: list[str] | None = None) -> list[dict]:
    """Rows for ``variants`` (default: the params'), latest then champion, in order."""
    from rcnnops import registry, tracking

    tracking.setup(params.register.experiment)
    models, reports = Path(params.train.out), Path(params.evaluate.out)
    rows = []
    for v in variants or params.variants:
        latest = latest_row(v, models, reports)
        if latest is not None:
            latest["version"] = _registered_version(v, models)
            rows.append(latest)
        mv = registry.get_alias(registry.model_name(v), registry.CHAMPION)
        if mv is not None:
            rows.append(champion_row(v, mv))
    return rows


# --- rendering ---------------------------------------------------------------------


def _cell(col: str, value: Any) -> str:
    if value is None:
        return "-"
    if col in METRICS:
        return f"{value:.3f}"
    if col in ("train_s", "infer_ms"):
        return f"{value:.1f}"
    if col == "parameters":
        return f"{value:,}"
    if col in ("data_hash", "run_id"):
        return str(value)[:12]
    return str(value)


def render(rows: list[dict], fmt: str = "table") -> str:
    """``rows`` as an aligned text table, a Markdown table, CSV or JSON."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows({c: "" if r.get(c) is None else r[c] for c in COLUMNS} for r in rows)
        return buf.getvalue().rstrip("\n")
    from rcnnops.tables import markdown_table, text_table

    cells = [[_cell(c, r.get(c)) for c in TABLE_COLUMNS] for r in rows]
    if fmt == "markdown":
        return markdown_table(TABLE_COLUMNS, cells)
    return text_table(TABLE_COLUMNS, cells)


# --- the picture -------------------------------------------------------------------


def _ground_truth(coco: dict, image_id: int) -> list[dict]:
    records = []
    for a in coco["annotations"]:
        if a["image_id"] == image_id and not a.get("iscrowd", 0):
            r = {"bbox": a["bbox"], "category_id": a["category_id"], "score": 1.0}
            if a.get("segmentation"):
                r["segmentation"] = a["segmentation"]
            records.append(r)
    return records


def pick_images(coco: dict, n: int) -> list[dict]:
    """The first ``n`` validation images (by id) that have objects."""
    with_objects = {a["image_id"] for a in coco["annotations"]}
    images = sorted(coco["images"], key=lambda im: im["id"])
    return [im for im in images if im["id"] in with_objects][:n]


def side_by_side(
    params: Any,
    variants: list[str] | None = None,
    out: Path | None = None,
    n_images: int = 3,
    score_threshold: float = 0.5,
) -> Path | None:
    """Ground truth + each evaluated variant's predictions on the same validation
    images, one row per image; None when no variant has predictions."""
    from rcnnops.data.io import load_image_array, safe_image_path
    from rcnnops.data.prepare import load_split
    from rcnnops.plots import draw_detections, pyplot, save_figure

    reports = Path(params.evaluate.out)
    preds = {}
    for v in variants or params.variants:
        path = reports / v / "predictions.json"
        if path.is_file():
            preds[v] = read_report(path, list)
    if not preds:
        return None
    coco, root, labels = load_split(Path(params.prepare.out), "val")
    names = dict(zip(labels.category_ids, labels.names, strict=True))
    images = pick_images(coco, n_images)
    columns = {"ground truth": lambda i: _ground_truth(coco, i)} | {
        v: (lambda i, p=p: [r for r in p if r["image_id"] == i and r["score"] >= score_threshold])
        for v, p in preds.items()
    }
    plt = pyplot()
    nrows, ncols = max(len(images), 1), len(columns)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.6 * nrows), squeeze=False)
    for r, im in enumerate(images):
        pixels = load_image_array(safe_image_path(root, im["file_name"], f"image {im['id']}"))
        for c, (title, records) in enumerate(columns.items()):
            ax = axes[r][c]
            draw_detections(ax, pixels, records(im["id"]), names)
            if r == 0:
                ax.set_title(title, fontsize=9)
    fig.suptitle(f"validation images, detections scoring >= {score_threshold}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, Path(out or reports / PLOT))


class PictureError(UserError, RuntimeError):
    """The comparison's picture could not be drawn (bad input: the message says)."""


_BAD_INPUT = 2  # the drawing process's exit code for a UserError (its message on stderr)


def side_by_side_in_a_process(params_file: Path, variants: list[str]) -> Path | None:
    """:func:`side_by_side` for ``params_file``'s project (the current folder) in a
    Python process of its own: the flow draws the picture there, on the other core,
    while its own process registers the variants. Raises :class:`PictureError` with
    the message of the input error that stopped it (a missing image, a corrupt
    predictions file), or ``RuntimeError`` with its output for anything else."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "rcnnops.compare", str(params_file), *variants]
    done = subprocess.run(argv, capture_output=True, text=True)
    error = done.stderr.strip() or done.stdout.strip()
    if done.returncode == _BAD_INPUT:
        raise PictureError(error)
    if done.returncode != 0:
        raise RuntimeError(f"drawing {PLOT.name} failed (exit code {done.returncode}):\n{error}")
    drawn = done.stdout.strip()
    return Path(drawn) if drawn else None


# --- MLflow ------------------------------------------------------------------------


def fingerprint(rows: list[dict]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def log_to_mlflow(experiment: str, rows: list[dict], plot: Path | None) -> str | None:
    """Log the comparison (table as JSON + Markdown, the picture) as a run named
    ``compare`` in ``<experiment>-compare``; skipped (None) when the latest such run
    already holds the same comparison. Returns the run id."""
    from rcnnops import tracking

    name = f"{experiment}-compare"
    exp_id = tracking.setup(name)
    digest = fingerprint(rows)
    last = tracking.client().search_runs([exp_id], order_by=["start_time DESC"], max_results=1)
    if last and last[0].data.tags.get("compare_hash") == digest:
        return None
    with (
        tracking.stage_run(name, "compare", tags={"compare_hash": digest}) as run,
        tempfile.TemporaryDirectory() as tmp,
    ):
        for fname, fmt in (("comparison.json", "json"), ("comparison.md", "markdown")):
            (Path(tmp) / fname).write_text(render(rows, fmt) + "\n")
            tracking.log_artifact(Path(tmp) / fname)
        if plot is not None:
            tracking.log_artifact(plot)
        return run.info.run_id


if __name__ == "__main__":  # side_by_side_in_a_process's: PARAMS_FILE VARIANT...
    import sys

    from rcnnops.config import load_params

    try:
        _drawn = side_by_side(load_params(Path(sys.argv[1])), sys.argv[2:] or None)
    except UserError as _e:
        print(_e, file=sys.stderr)
        sys.exit(_BAD_INPUT)
    print(_drawn or "")
