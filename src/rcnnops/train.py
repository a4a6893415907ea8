"""[stage] train: fit one variant, checkpoint every epoch, resume automatically.

Outputs (``train.out/<variant>/``): ``model.pt`` and ``model.json`` (see
:mod:`rcnnops.models.io`), ``loss.csv`` / ``loss.png``, and ``checkpoints/``
(not a DVC output), from which an interrupted run resumes when its fingerprint
(params + data + code) still matches. The loop itself is :mod:`rcnnops.engine`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rcnnops import distributed, tracking
from rcnnops.checkpoints import Checkpoints, code_hash
from rcnnops.config import Params, VariantTrainParams, flatten, stable_hash, to_dict
from rcnnops.data.dataset import DetectionDataset, LabelMap
from rcnnops.data.io import DataError
from rcnnops.data.prepare import load_manifest, load_split
from rcnnops.data.transforms import RandomHorizontalFlip
from rcnnops.device import device_tags, resolve_device
from rcnnops.distributed import World
from rcnnops.engine import fit
from rcnnops.metrics import coco_evaluate, predict
from rcnnops.models import MASK_VARIANTS, USES_PROPOSALS, build_model
from rcnnops.models.io import save_model
from rcnnops.models.weights import LoadReport, count_parameters, load_pretrained, write_report
from rcnnops.plots import plot_loss, write_loss_csv
from rcnnops.precision import resolve_amp
from rcnnops.solver import FitConfig


def run(params: Params, variant: str, progress: bool = True) -> dict:
    """The stage: train ``variant`` with ``params``; returns the model's meta (``model.json``).

    Under torchrun every process calls it (see :mod:`rcnnops.distributed`); rank 0
    returns the meta, the others an empty dict.
    """
    world = distributed.from_env()
    device = distributed.start(world, resolve_device(params.train.device))
    try:
        return _run(params, variant, world, device, progress and world.main)
    finally:
        distributed.stop(world)


@dataclass
class Data:
    """The prepared splits as datasets, and what identifies them."""

    train: DetectionDataset
    val: DetectionDataset
    val_coco: dict
    labels: LabelMap
    manifest: dict
    proposals: dict  # the proposal store's params, for the fingerprint ({} without)
    train_plain: DetectionDataset  # the training images without augmentation


def load_data(params: Params, variant: str) -> Data:
    """Training (augmented) and validation datasets of ``variant`` (with the
    precomputed proposals for the variants that take them, masks for mask variants)."""
    vp, prepared = params.variant(variant), Path(params.prepare.out)
    manifest = load_manifest(prepared)
    train_coco, train_root, labels = load_split(prepared, "train")
    val_coco, val_root, _ = load_split(prepared, "val")
    train_props = val_props = None
    store_params: dict = {}
    if variant in USES_PROPOSALS:
        from rcnnops.proposals.store import open_store

        train_store, val_store = open_store(params, "train"), open_store(params, "val")
        train_props, val_props = train_store.boxes_for, val_store.boxes_for
        store_params = {"proposals": train_store.index["params"]}
        for split, store in (("train", train_store), ("val", val_store)):
            if store.empty_images:
                print(
                    f"{split}: {len(store.empty_images)} image(s) without any proposal "
                    "(they train on ground truth only and get no detections)"
                )
    masks = variant in MASK_VARIANTS
    try:
        flip = RandomHorizontalFlip(vp.hflip)
        train = DetectionDataset(
            train_coco, train_root, labels, flip, proposals=train_props, masks=masks
        )
    except DataError as e:
        raise DataError(f"{prepared / 'train.json'}: {e}") from None
    val = DetectionDataset(val_coco, val_root, labels, proposals=val_props)
    plain = DetectionDataset(train_coco, train_root, labels, proposals=train_props)
    return Data(train, val, val_coco, labels, manifest, store_params, plain)


def fit_config(
    vp: VariantTrainParams, common: Any, world: World, select: str | None = None
) -> FitConfig:
    """The solver settings of ``vp``; lr scaled for data-parallel processes;
    ``select``: the validation metric that picks the kept epoch (``keep: best``)."""
    return FitConfig(
        epochs=vp.epochs,
        batch_size=vp.batch_size,
        lr=distributed.scale_lr(vp.lr, world.size),
        momentum=vp.momentum,
        weight_decay=vp.weight_decay,
        warmup_iters=vp.warmup_iters,
        lr_steps=vp.lr_steps,
        gamma=vp.gamma,
        amp=vp.amp,
        clip_grad_norm=vp.clip_grad_norm,
        seed=common.seed,
        workers=common.workers,
        log_every=common.log_every,
        eval_every=common.eval_every,
        sync_bn=common.sync_bn,
        select=select if (vp.keep == "best" or vp.early_stop) else None,
        patience=vp.early_stop,
    )


def validator(params: Params, data: Data, masks: bool, device: torch.device):
    """``validate(model, epoch)``: COCO AP (bbox, and segm for mask variants) and
    inference time on the validation split, as ``val/*`` metrics."""

    def validate(m: nn.Module, epoch: int) -> dict[str, float]:
        results, ms = predict(
            m, data.val, data.labels, device, params.evaluate.batch_size, progress=False
        )
        backend = params.evaluate.backend
        stats, _, _ = coco_evaluate(data.val_coco, results, "bbox", backend)
        if masks:
            stats |= coco_evaluate(data.val_coco, results, "segm", backend)[0]
        return {f"val/{k}": v for k, v in stats.items()} | {"val/infer_ms_per_image": ms}

    return validate


def _identity(
    params: Params,
    variant: str,
    data: Data,
    world: World,
    device,
    precision: str,
    weights: LoadReport | None = None,
) -> tuple[str, str]:
    """(params hash, checkpoint fingerprint) of this training. The resolved
    precision is part of it (``amp: auto`` means bf16 on one CPU, fp32 on another),
    and the pretrained file's bytes: new weights under the same path do not resume
    checkpoints trained from the old ones."""
    extra = dict(data.proposals) | {"precision": precision}
    if weights is not None:
        extra |= {"pretrained_sha256": weights.sha256}
    if world.distributed:  # it changes the numbers, so it is part of what was trained
        extra |= {
            "world_size": world.size,
            "sync_bn": params.train.sync_bn and device.type == "cuda",
        }
    vp, seed = params.variant(variant), params.train.seed
    params_hash = stable_hash({"variant": variant, "train": vp, "seed": seed} | extra)
    return params_hash, f"{params_hash}:{data.manifest['data_hash']}:{code_hash()}"


def peak_memory(device: torch.device) -> dict[str, float]:
    """This process's peak memory so far, in MiB: resident set size, and the CUDA
    allocator's peak on a GPU."""
    import resource

    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


def _log_weights(report: LoadReport, out_dir: Path) -> None:
    """Which tensors the pretrained weights filled, re-initialised or left unused."""
    tracking.log_params(
        {
            "pretrained.file": Path(report.file).name,
            "pretrained.sha256": report.sha256,
            "pretrained.loaded": len(report.loaded),
            "pretrained.reinitialised": len(report.reinitialised),
            "pretrained.unused": len(report.unused),
            "pretrained.by_name": len(report.by_name),
        }
    )
    tracking.log_artifact(write_report(report, out_dir / "weights.json"), "training")


def _keep_best(job: _Job, summary: dict, log) -> None:
    """With ``keep: best``, the best validated epoch's weights become the model;
    MLflow records which epoch (``best_epoch``) and its metric."""
    best = summary.get("best") or {}
    if not best:
        return
    log({"best_epoch": best["epoch"], f"best/{job.cfg.select}": best["value"]})
    if job.params.variant(job.variant).keep != "best":
        return
    job.model.load_state_dict(best["model"])
    print(f"keeping epoch {best['epoch']} ({job.cfg.select}={best['value']:.4f})")


def _second_stage(model: nn.Module, data: Data, validate, log, epochs: int) -> None:
    """A variant's step after fine-tuning, if it has one (R-CNN's per-class SVMs with
    ``classifier: svm``), then validation again, logged as ``val_<name>/*``."""
    second_stage = getattr(model, "second_stage", None)
    if second_stage is None:
        return
    name = second_stage(data.train_plain[i] for i in range(len(data.train_plain)))
    if name is None:
        return
    after = validate(model, epochs)
    print(f"with {name}: " + " ".join(f"{k}={v:.4f}" for k, v in after.items()))
    log({k.replace("val/", f"val_{name}/"): v for k, v in after.items()})


def _run(params: Params, variant: str, world: World, device: torch.device, progress: bool) -> dict:
    vp, common = params.variant(variant), params.train
    data = load_data(params, variant)
    torch.manual_seed(common.seed)  # model initialisation
    model = build_model(variant, data.labels.num_classes + 1, vp.model)
    weights = None
    if vp.model.get("pretrained"):  # before any training: a missing file stops here
        weights = load_pretrained(model, vp.model["pretrained"], data.labels.names)
        if world.main:
            print(weights.summary())
    precision = resolve_amp(vp.amp, device).name
    params_hash, fingerprint = _identity(params, variant, data, world, device, precision, weights)
    out_dir = Path(common.out) / variant
    checkpoints = Checkpoints(out_dir / "checkpoints", rerun=f"dvc repro train@{variant}")
    cfg = fit_config(vp, common, world, f"val/{params.register.metric_for(variant)}")
    if not world.main:  # the other ranks train; rank 0 logs, validates and writes files
        fit(model, data.train, cfg, checkpoints, fingerprint, device, progress=False, world=world)
        return {}
    if world.distributed:
        print(
            f"data-parallel on {world.size} processes ({device.type}): global batch "
            f"{world.size * vp.batch_size} ({world.size} x {vp.batch_size}), "
            f"lr {vp.lr:g} x {world.size} = {cfg.lr:g}"
        )
    # as `dvc repro` does: a failed run leaves none (nor an earlier training's loss curve)
    for stale in ("model.pt", "model.json", "loss.csv", "loss.png"):
        (out_dir / stale).unlink(missing_ok=True)
    tags = {
        "variant": variant,
        "data_hash": data.manifest["data_hash"],
        "params_hash": params_hash,
        "git_commit": tracking.git_commit(),
        "mlflow.runName": variant,
    } | device_tags(device, precision)
    job = _Job(
        params, variant, data, model, cfg, checkpoints, fingerprint, device, world, precision,
        weights,
    )  # fmt: skip
    summary, seconds, run_id = _tracked_fit(job, tags, out_dir, progress)
    meta = {
        "variant": variant,
        "num_classes": data.labels.num_classes + 1,
        "model_params": vp.model,
        "labels": data.labels.to_json(),
        "data_hash": data.manifest["data_hash"],
        "val_hash": data.manifest["val_hash"],
        "params_hash": params_hash,
        "code_hash": fingerprint.rsplit(":", 1)[1],
        "git_commit": tags["git_commit"],
        "run_id": run_id,
        "device": str(device),
        "precision": precision,
        "world_size": world.size,
        "train_seconds": round(seconds, 2),
        "parameters": count_parameters(model),
        "epochs": summary["epochs"],
        "kept_epoch": (summary.get("best") or {}).get("epoch") if vp.keep == "best" else None,
        "steps": summary["steps"],
        "final": summary["history"][-1] if summary["history"] else {},
    }
    save_model(model, out_dir, meta)
    return meta


@dataclass
class _Job:
    """One training, as :func:`_tracked_fit` needs it."""

    params: Params
    variant: str
    data: Data
    model: nn.Module
    cfg: FitConfig
    checkpoints: Checkpoints
    fingerprint: str
    device: torch.device
    world: World
    precision: str = "fp32"  # resolve_amp(amp, device).name, as tagged
    weights: LoadReport | None = None  # what the pretrained weights filled


def _tracked_fit(job: _Job, tags: dict, out_dir: Path, progress: bool) -> tuple[dict, float, str]:
    """Fit (then the variant's second stage) inside its MLflow run, resumed with the
    checkpoint it belongs to; loss curve as CSV + picture. Returns (summary,
    seconds, run id)."""
    vp, common, data = job.params.variant(job.variant), job.params.train, job.data
    validate = validator(job.params, data, job.variant in MASK_VARIANTS, job.device)
    resumable = job.checkpoints.resumable(job.fingerprint)
    run_id = resumable.get("extra", {}).get("run_id") if resumable else None
    t0 = time.perf_counter()
    with tracking.stage_run(job.params.register.experiment, job.variant, run_id, tags) as active:
        log = tracking.metric_logger(tracking.last_steps(run_id) if run_id else {})
        tracking.log_params(
            flatten(to_dict(vp), "train.")
            | {
                "variant": job.variant,
                "seed": common.seed,
                "device": str(job.device),
                "precision": job.precision,
                "num_classes": data.labels.num_classes,
                "train_images": len(data.train),
                "val_images": len(data.val),
                "world_size": job.world.size,
                "lr_scaled": job.cfg.lr,
            }
        )
        if run_id is None:  # a new run: which data it trains and validates on
            splits, out = data.manifest.get("splits", {}), job.params.prepare.out
            tracking.log_datasets([
                (s, f"{out}/{s}.json", splits.get(s, {}).get("hash", data.manifest["data_hash"]), c)
                for s, c in (("train", "training"), ("val", "validation"))
            ])  # fmt: skip
        if job.weights is not None:
            _log_weights(job.weights, out_dir)
        else:  # an earlier training's report would describe weights this model lacks
            (out_dir / "weights.json").unlink(missing_ok=True)
        extra = {"run_id": active.info.run_id}
        summary = fit(
            job.model, data.train, job.cfg, job.checkpoints, job.fingerprint, job.device,
            validate, log, extra, progress, job.world,
        )  # fmt: skip
        _keep_best(job, summary, log)
        _second_stage(job.model, data, validate, log, job.cfg.epochs)
        # a resumed training's time includes the interrupted runs' (up to its checkpoint)
        seconds = summary.get("resumed_seconds", 0.0) + time.perf_counter() - t0
        log({"train_seconds": seconds} | peak_memory(job.device))
        write_loss_csv(summary["steps_log"], out_dir / "loss.csv")
        plot_loss(summary["steps_log"], out_dir / "loss.png", job.variant)
        tracking.log_artifact(out_dir / "loss.png", "training")
    return summary, seconds, active.info.run_id
