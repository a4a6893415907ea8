"""[stage] train: fit one variant, checkpoint every epoch, resume automatically.

Outputs (``train.out/<variant>/``): ``model.pt`` (a plain state dict, loadable
with ``weights_only=True``), ``model.json`` (everything needed to rebuild and
trace the model: variant, builder params, labels, data/params hashes, MLflow
run id, timings) and ``checkpoints/`` (DVC ``persist: true``), from which an
interrupted run resumes when its fingerprint (params + data) still matches.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from rcnnops.data.coco import collate


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded (corrupt, truncated, or not ours)."""


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device is {name!r} but no CUDA device is available")
    return device


def lr_factor(
    warmup_iters: int, iters_per_epoch: int, lr_steps: list[int], gamma: float
) -> Callable[[int], float]:
    """Per-iteration LR multiplier: linear warm-up from 0.001, then step decay
    by ``gamma`` at each epoch in ``lr_steps``."""

    def f(it: int) -> float:
        warm = 1.0
        if it < warmup_iters:
            alpha = it / warmup_iters
            warm = 0.001 * (1 - alpha) + alpha
        epoch = it // max(iters_per_epoch, 1)
        return warm * gamma ** sum(epoch >= s for s in lr_steps)

    return f


@dataclass
class Checkpoints:
    """``epoch_NNN.pt`` files in one folder; the newest ``keep`` are kept."""

    folder: Path
    keep: int = 2

    def latest(self) -> Path | None:
        files = sorted(self.folder.glob("epoch_*.pt"))
        return files[-1] if files else None

    def save(self, state: dict, epoch: int) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"epoch_{epoch:04d}.pt"
        tmp = path.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: a kill never leaves a half-written checkpoint
        for old in sorted(self.folder.glob("epoch_*.pt"))[: -self.keep]:
            old.unlink()
        return path

    def load(self, path: Path) -> dict:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, pickle payloads, wrong format...
            raise CheckpointError(
                f"{path}: cannot load checkpoint ({type(e).__name__}: {e}); delete it to "
                f"resume from an earlier one, or delete {self.folder} to train from scratch"
            ) from None
        if not isinstance(state, dict) or not {"model", "epoch", "fingerprint"} <= set(state):
            raise CheckpointError(f"{path}: not an rcnnops checkpoint; delete it")
        return state

    def clear(self) -> None:
        if self.folder.exists():
            shutil.rmtree(self.folder)


@dataclass
class FitConfig:
    """Solver settings for :func:`fit` (numbers only; see params ``train``)."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    lr_steps: list[int] = field(default_factory=list)
    gamma: float = 0.1
    amp: bool = True
    clip_grad_norm: float | None = 10.0
    seed: int = 0
    workers: int = 0
    log_every: int = 10
    eval_every: int = 1


def _loader(dataset: Dataset, cfg: FitConfig, epoch: int, device: torch.device) -> DataLoader:
    # The order depends only on (seed, epoch): resuming at epoch e replays it.
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    order = torch.randperm(len(dataset), generator=g).tolist()
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=order,
        collate_fn=collate,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
    )


def split_proposals(targets: list[dict]) -> list | None:
    """Take precomputed proposals out of the targets (they are a model input)."""
    if not targets or "proposals" not in targets[0]:
        return None
    return [t.pop("proposals") for t in targets]


def _to(device: torch.device, images: list, targets: list) -> tuple[list, list]:
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    return images, targets


def fit(
    model: nn.Module,
    train_set: Dataset,
    cfg: FitConfig,
    checkpoints: Checkpoints,
    fingerprint: str,
    device: torch.device,
    validate: Callable[[nn.Module, int], dict[str, float]] | None = None,
    log: Callable[[dict[str, float], int], None] | None = None,
    extra_state: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict:
    """Train ``model`` for ``cfg.epochs``, resuming from ``checkpoints`` when the
    newest one carries the same ``fingerprint`` (else starting fresh).

    ``validate(model, epoch)`` returns metrics logged after each epoch;
    ``log(metrics, step)`` receives ``train/loss_*`` every ``log_every`` steps.
    ``extra_state`` (e.g. the MLflow run id) is stored in each checkpoint and
    returned as ``state["extra"]``. Returns the final state's summary.
    """
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    iters = math.ceil(len(train_set) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_factor(cfg.warmup_iters, iters, cfg.lr_steps, cfg.gamma)
    )
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    start_epoch, step, history, steps_log = 0, 0, [], []
    extra = dict(extra_state or {})
    latest = checkpoints.latest()
    if latest is not None:
        state = checkpoints.load(latest)
        if state["fingerprint"] == fingerprint:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"])
            start_epoch, step = state["epoch"], state["step"]
            history, extra = state["history"], state.get("extra", extra)
            steps_log = state.get("steps_log", [])
            print(f"resuming from {latest} (epoch {start_epoch}/{cfg.epochs})")
        else:
            print(
                f"{checkpoints.folder}: checkpoints are from other params, data or code; "
                "training from scratch"
            )
            checkpoints.clear()
            latest = None
    if latest is None:  # a fresh start is seeded the same way, whatever was there before
        torch.manual_seed(cfg.seed)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        sums: dict[str, float] = {}
        bar = tqdm(
            _loader(train_set, cfg, epoch, device),
            total=iters,
            disable=not progress,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="batch",
            leave=False,
        )
        for images, targets in bar:
            images, targets = _to(device, images, targets)
            proposals = split_proposals(targets)
            with torch.autocast(device_type=device.type, enabled=use_amp):
                losses = model(images, targets, proposals) if proposals else model(images, targets)
            loss = sum(losses.values())
            values = {k: float(v.detach()) for k, v in losses.items()}
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise TrainingDiverged(
                    f"non-finite loss at epoch {epoch + 1}, step {step}: {values}; the last "
                    f"good checkpoint is {checkpoints.latest() or 'none'} (lower train lr?)"
                )
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.clip_grad_norm:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{opt.param_groups[0]['lr']:.4f}")
            if step % cfg.log_every == 0:
                logged = {f"train/{k}": v for k, v in values.items()} | {
                    "train/loss": loss_value,
                    "train/lr": opt.param_groups[0]["lr"],
                }
                steps_log.append({"step": step, **logged})
                if log is not None:
                    log(logged, step)
        n = max(1, iters)
        record = {"epoch": epoch + 1, **{f"train/{k}": v / n for k, v in sums.items()}}
        if validate is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            record.update(validate(model, epoch + 1))
        if log is not None:
            log({k: v for k, v in record.items() if k != "epoch"}, epoch + 1)
        history.append(record)
        print(
            " ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
            )
        )
        checkpoints.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": torch.get_rng_state(),
                "epoch": epoch + 1,
                "step": step,
                "history": history,
                "steps_log": steps_log,
                "fingerprint": fingerprint,
                "extra": extra,
            },
            epoch + 1,
        )
    return {
        "epochs": cfg.epochs,
        "steps": step,
        "history": history,
        "steps_log": steps_log,
        "extra": extra,
    }


def save_model(model: nn.Module, out_dir: Path, meta: dict) -> None:
    """``model.pt`` (state dict) and ``model.json`` (meta), written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "model.pt.tmp"
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, out_dir / "model.pt")
    (out_dir / "model.json").write_text(json.dumps(meta, indent=2))


def read_model_meta(model_dir: Path) -> dict:
    path = Path(model_dir) / "model.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no trained model here; train it with `dvc repro train@<variant>`"
        )
    return json.loads(path.read_text())


def load_model(model_dir: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a trained model from ``model.json`` + ``model.pt`` (weights only)."""
    from rcnnops.models import build_model

    model_dir = Path(model_dir)
    meta = read_model_meta(model_dir)
    model = build_model(meta["variant"], meta["num_classes"], meta["model_params"])
    path = model_dir / "model.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot load model weights ({type(e).__name__}: {e}); "
            f"retrain with `dvc repro -f train@{meta['variant']}`"
        ) from None
    return model.to(device).eval(), meta


def code_hash() -> str:
    """sha256 of the package's Python sources: a checkpoint made by other code
    (a changed model, loss or sampler) must not be resumed as if it were ours."""
    import hashlib

    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _resumable_run_id(checkpoints: Checkpoints, fingerprint: str) -> str | None:
    latest = checkpoints.latest()
    if latest is None:
        return None
    state = checkpoints.load(latest)
    if state["fingerprint"] != fingerprint:
        return None
    return state.get("extra", {}).get("run_id")


def run(params, variant: str, progress: bool = True) -> dict:
    """The stage: train ``variant`` with ``params`` (a :class:`rcnnops.config.Params`)."""
    from rcnnops import tracking
    from rcnnops.config import flatten, stable_hash, to_dict
    from rcnnops.data.coco import CocoDetection, DataError
    from rcnnops.data.prepare import load_manifest, load_split
    from rcnnops.data.transforms import RandomHorizontalFlip
    from rcnnops.metrics import coco_evaluate, predict
    from rcnnops.models import MASK_VARIANTS, USES_PROPOSALS, build_model
    from rcnnops.plots import plot_loss, write_loss_csv

    vp, common = params.variant(variant), params.train
    prepared = Path(params.prepare.out)
    manifest = load_manifest(prepared)
    train_coco, train_root, labels = load_split(prepared, "train")
    val_coco, val_root, _ = load_split(prepared, "val")
    train_props = val_props = None
    extra_hash: dict = {}
    if variant in USES_PROPOSALS:
        from rcnnops.proposals.precompute import open_store

        train_store, val_store = open_store(params, "train"), open_store(params, "val")
        train_props, val_props = train_store.boxes_for, val_store.boxes_for
        extra_hash = {"proposals": train_store.index["params"]}
        for split, store in (("train", train_store), ("val", val_store)):
            if store.empty_images:
                print(
                    f"{split}: {len(store.empty_images)} image(s) without any proposal "
                    "(they train on ground truth only and get no detections)"
                )
    masks = variant in MASK_VARIANTS
    try:
        train_set = CocoDetection(
            train_coco,
            train_root,
            labels,
            RandomHorizontalFlip(vp.hflip),
            proposals=train_props,
            masks=masks,
        )
    except DataError as e:
        raise DataError(f"{prepared / 'train.json'}: {e}") from None
    val_set = CocoDetection(val_coco, val_root, labels, proposals=val_props)
    device = resolve_device(common.device)
    torch.manual_seed(common.seed)  # model initialisation
    model = build_model(variant, labels.num_classes + 1, vp.model)
    params_hash = stable_hash({"variant": variant, "train": vp, "seed": common.seed} | extra_hash)
    fingerprint = f"{params_hash}:{manifest['data_hash']}:{code_hash()}"
    out_dir = Path(common.out) / variant
    checkpoints = Checkpoints(out_dir / "checkpoints")
    cfg = FitConfig(
        epochs=vp.epochs,
        batch_size=vp.batch_size,
        lr=vp.lr,
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
    )

    def validate(m: nn.Module, epoch: int) -> dict[str, float]:
        results, ms = predict(
            m, val_set, labels, device, params.evaluate.batch_size, progress=False
        )
        stats, _, _ = coco_evaluate(val_coco, results)
        if masks:
            stats |= coco_evaluate(val_coco, results, "segm")[0]
        return {f"val/{k}": v for k, v in stats.items()} | {"val/infer_ms_per_image": ms}

    tags = {
        "variant": variant,
        "data_hash": manifest["data_hash"],
        "params_hash": params_hash,
        "git_commit": tracking.git_commit(),
        "device": str(device),
        "mlflow.runName": variant,
    }
    run_id = _resumable_run_id(checkpoints, fingerprint)
    t0 = time.perf_counter()
    with tracking.stage_run(params.register.experiment, variant, run_id, tags) as active:
        tracking.log_params(
            flatten(to_dict(vp), "train.")
            | {
                "variant": variant,
                "seed": common.seed,
                "device": str(device),
                "num_classes": labels.num_classes,
                "train_images": len(train_set),
                "val_images": len(val_set),
            }
        )
        summary = fit(
            model,
            train_set,
            cfg,
            checkpoints,
            fingerprint,
            device,
            validate,
            tracking.log_metrics,
            {"run_id": active.info.run_id},
            progress,
        )
        if getattr(model, "classifier", None) == "svm":  # R-CNN's second stage
            plain = CocoDetection(train_coco, train_root, labels, proposals=train_props)
            counts = model.cpu().fit_svms(plain[i] for i in range(len(plain)))
            model.to(device)
            print(f"trained {len(counts)} per-class SVMs (+ ridge box regressors)")
            after = validate(model, cfg.epochs)
            print("with SVMs: " + " ".join(f"{k}={v:.4f}" for k, v in after.items()))
            tracking.log_metrics({k.replace("val/", "val_svm/"): v for k, v in after.items()})
        seconds = time.perf_counter() - t0
        tracking.log_metrics({"train_seconds": seconds})
        write_loss_csv(summary["steps_log"], out_dir / "loss.csv")
        plot_loss(summary["steps_log"], out_dir / "loss.png", variant)
        tracking.log_artifact(out_dir / "loss.png", "training")
        run_id = active.info.run_id
    from rcnnops.models.parts import count_parameters

    meta = {
        "variant": variant,
        "num_classes": labels.num_classes + 1,
        "model_params": vp.model,
        "labels": labels.to_json(),
        "data_hash": manifest["data_hash"],
        "val_hash": manifest["val_hash"],
        "params_hash": params_hash,
        "code_hash": fingerprint.rsplit(":", 1)[1],
        "git_commit": tags["git_commit"],
        "run_id": run_id,
        "device": str(device),
        "train_seconds": round(seconds, 2),
        "parameters": count_parameters(model),
        "epochs": summary["epochs"],
        "steps": summary["steps"],
        "final": summary["history"][-1] if summary["history"] else {},
    }
    save_model(model, out_dir, meta)
    return meta
