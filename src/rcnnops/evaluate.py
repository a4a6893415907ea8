"""[stage] evaluate: predictions on the validation split -> COCO results -> COCOeval.

Outputs (``evaluate.out/<variant>/``): ``metrics.json`` (DVC metrics: the 12
standard COCO numbers as ``bbox_AP``, ``bbox_AP50``..., and ``segm_AP``... for
mask variants, per-class AP, ``infer_ms_per_image``), ``predictions.json``
(COCO results format: ``bbox`` xywh, ``segmentation`` compressed RLE for mask
variants), ``pr_curve.png`` (precision-recall curves, bbox and segm) and
``samples.png`` (detections drawn on validation images), and
``serving_check.json``: the model as the registry will log it (weights bundle +
pyfunc) passed MLflow's check of it as served (:func:`rcnnops.serving_check.check`; the
registry then does not load it again). Metrics and plots are also logged to the
MLflow run that trained the model.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from rcnnops.errors import UserError
from rcnnops.metrics import coco_evaluate, predict
from rcnnops.plots import plot_pr, plot_samples

SAMPLE_IMAGES = 8
SAMPLE_SCORE = 0.5


def summarise(evals: dict[str, tuple[dict, dict]], ms: float) -> dict:
    """The metrics.json document from ``{iou_type: (stats, per_class)}``.

    Per-class AP of the first IoU type (bbox) is ``per_class_AP``; others are
    ``per_class_<type>_AP``. NaN (a class absent from validation) -> null.
    """
    doc: dict = {}
    for stats, _ in evals.values():
        doc.update({k: round(v, 6) for k, v in stats.items()})
    doc["infer_ms_per_image"] = round(ms, 3)
    for i, (iou_type, (_, per_class)) in enumerate(evals.items()):
        key = "per_class_AP" if i == 0 else f"per_class_{iou_type}_AP"
        doc[key] = {k: (None if math.isnan(v) else round(v, 6)) for k, v in per_class.items()}
    return doc


def write_samples(dataset, results: list[dict], labels, path: Path, title: str) -> None:
    """The first validation images with their detections scoring >= 0.5."""
    from rcnnops.data.io import load_image_array

    names = dict(zip(labels.category_ids, labels.names, strict=True))
    by_image: dict[int, list[dict]] = {}
    for r in results:
        if r["score"] >= SAMPLE_SCORE:
            by_image.setdefault(r["image_id"], []).append(r)
    n = min(SAMPLE_IMAGES, len(dataset))
    images = [load_image_array(dataset.image_path(i)) for i in range(n)]
    records = [by_image.get(dataset.images[i]["id"], []) for i in range(n)]
    plot_samples(images, records, names, path, f"{title}: detections (score >= {SAMPLE_SCORE})")


class NotServable(UserError, RuntimeError):
    """The model fails as the registry would serve it (the message says how)."""


def check_serving(params, variant: str, model_dir: Path, out_dir: Path) -> None:
    """The registry's check of the model as served (:func:`rcnnops.serving_check.check`), run
    here where the model's modules are loaded already; its record in ``out_dir``."""
    from rcnnops import serving_check as sc

    with tempfile.TemporaryDirectory() as tmp:
        serving = sc.serving_settings(params, variant)
        bundle = sc.write_bundle(model_dir, Path(tmp) / "model_dir", serving)
        try:
            sc.check(bundle, out_dir / sc.CHECK_FILE)
        except sc.ServingCheckError as e:
            raise NotServable(
                f"{model_dir}: the model does not work as served: saved as the registry "
                f"logs it and loaded as a server loads it, it failed on its input example "
                f"({e}); nothing can be registered until it does"
            ) from None


def run(params, variant: str, progress: bool = True) -> dict:
    """The stage: evaluate the trained ``variant`` on the prepared validation split."""
    from rcnnops import tracking
    from rcnnops.data.dataset import DetectionDataset
    from rcnnops.data.io import DataError
    from rcnnops.data.prepare import load_manifest, load_split
    from rcnnops.device import resolve_device
    from rcnnops.files import sha256_file, write_atomic
    from rcnnops.models import MASK_VARIANTS, USES_PROPOSALS
    from rcnnops.models.io import load_model

    prepared = Path(params.prepare.out)
    manifest = load_manifest(prepared)
    val_coco, val_root, labels = load_split(prepared, "val")
    device = resolve_device(params.train.device)
    model_dir = Path(params.train.out) / variant
    model_hash = sha256_file(model_dir / "model.pt")  # what these metrics measure
    model, meta = load_model(model_dir, device, svd_rank=params.evaluate.svd_rank)
    if meta["data_hash"] != manifest["data_hash"]:
        raise DataError(
            f"{model_dir / 'model.json'}: the model was trained on other data "
            f"than {prepared}; retrain with `dvc repro train@{variant}`"
        )
    proposals = None
    if variant in USES_PROPOSALS:
        from rcnnops.proposals.store import open_store

        proposals = open_store(params, "val").boxes_for
    dataset = DetectionDataset(val_coco, val_root, labels, proposals=proposals)
    results, ms = predict(model, dataset, labels, device, params.evaluate.batch_size, progress)
    iou_types = ("bbox", "segm") if variant in MASK_VARIANTS else ("bbox",)
    evals, curves = {}, {}
    for t in iou_types:
        stats, per_class, curves[t] = coco_evaluate(val_coco, results, t, params.evaluate.backend)
        evals[t] = (stats, per_class)
    metrics = summarise(evals, ms) | {"model_hash": model_hash}

    out_dir = Path(params.evaluate.out) / variant
    out_dir.mkdir(parents=True, exist_ok=True)
    # metrics.json last: its presence means the report is complete. An earlier
    # one goes first (a kill left the new predictions beside the old metrics,
    # and `compare` showed one model's AP over another's detections); each file
    # is written whole.
    (out_dir / "metrics.json").unlink(missing_ok=True)
    check_serving(params, variant, model_dir, out_dir)
    write_atomic(out_dir / "predictions.json", json.dumps(results))
    plot_pr(curves, labels.names, out_dir / "pr_curve.png", variant)
    write_samples(dataset, results, labels, out_dir / "samples.png", variant)
    plots = ["pr_curve.png", "samples.png"]
    write_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False))
    with tracking.stage_run(params.register.experiment, variant, meta["run_id"]):
        tracking.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float)})
        for t, (_, per_class) in evals.items():
            prefix = "AP_class/" if t == "bbox" else f"{t}_AP_class/"
            tracking.log_metrics(
                {f"{prefix}{k}": v for k, v in per_class.items() if not math.isnan(v)}
            )
        tracking.set_tags({"val_hash": manifest["val_hash"]})
        for name in ("metrics.json", *plots):
            tracking.log_artifact(out_dir / name, "evaluation")
    return metrics
