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
import pickle
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from rcnnops import distributed
from rcnnops.data.coco import collate
from rcnnops.distributed import World


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite."""


class CheckpointError(RuntimeError):
    """A checkpoint or model file cannot be loaded (corrupt, truncated, or not
    ours). ``summary`` is the file and the cause, without the advice."""

    def __init__(self, message: str, summary: str | None = None) -> None:
        super().__init__(message)
        self.summary = summary or message


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
    """``epoch_NNNN.pt`` files in one folder; the newest ``keep`` are kept.

    ``rerun`` is the command that retrains (named in errors)."""

    folder: Path
    keep: int = 2
    rerun: str | None = None

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
        """The state saved at ``path``; :class:`CheckpointError` naming the file
        when it is truncated, garbage, a pickle with code in it, or not ours."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, pickle payloads, wrong format...
            why = _describe(e)
        else:
            if isinstance(state, dict) and {"model", "epoch", "fingerprint"} <= set(state):
                return state
            why = "not an rcnnops checkpoint"
        summary = f"{path}: cannot load checkpoint ({why})"
        raise CheckpointError(
            f"{summary}; delete it to resume from an earlier one, or {self._from_scratch()}",
            summary,
        )

    def latest_good(self) -> tuple[Path, dict] | None:
        """The newest checkpoint that loads, and its state (None when there is none).

        Atomic writes mean a kill never leaves a partial file, but disks and
        copies fail: an unreadable newer file is renamed ``*.corrupt`` (kept for
        inspection, never picked again) with a warning, and the previous one is
        used, costing one epoch. When files exist but none loads, raises
        :class:`CheckpointError` naming the newest and how to start over.
        """
        files = sorted(self.folder.glob("epoch_*.pt"), reverse=True)
        errors: list[tuple[Path, CheckpointError]] = []
        for path in files:
            try:
                state = self.load(path)
            except CheckpointError as e:
                errors.append((path, e))
                continue
            for bad, e in errors:
                aside = bad.with_suffix(".pt.corrupt")
                os.replace(bad, aside)
                print(
                    f"warning: {e.summary}: moved to {aside.name}; "
                    f"resuming from {path.name} instead",
                    file=sys.stderr,
                )
            return path, state
        if not errors:
            return None
        if len(errors) == 1:
            raise errors[0][1]
        raise CheckpointError(
            f"{errors[0][1].summary}, and no earlier checkpoint loads either "
            f"({', '.join(p.name for p, _ in errors[1:])}); {self._from_scratch()}"
        )

    def clear(self) -> None:
        if self.folder.exists():
            shutil.rmtree(self.folder)

    def _from_scratch(self) -> str:
        how = f"delete {self.folder} to train from scratch"
        return how + (f" (then `{self.rerun}`)" if self.rerun else "")


_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _describe(e: BaseException) -> str:
    """One line on why ``torch.load`` failed. Torch's own text runs to paragraphs
    and suggests ``weights_only=False``, which must never be the fix here."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if isinstance(e, pickle.UnpicklingError):
        detail = next((ln for ln in lines if not ln.startswith(_TORCH_BOILERPLATE)), "")
        return "not plain tensors, refused by weights-only loading" + (
            f": {detail[:200]}" if detail else ""
        )
    if isinstance(e, EOFError):
        return "empty or truncated file"
    first = lines[0].split(". ")[0] if lines else ""
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


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
    sync_bn: bool = False  # SyncBatchNorm across processes (CUDA only)


def _sampler(dataset: Dataset, cfg: FitConfig, world: World) -> DistributedSampler:
    """This rank's share of one permutation per epoch. The order depends only on
    (seed, epoch) (``set_epoch``), so a resumed epoch replays it; with one
    process it is the whole permutation, and rank r of N takes every N-th image
    of it, so N processes x ``batch_size`` see the global batches one process
    with N x ``batch_size`` would (the last batch padded by repeats)."""
    return DistributedSampler(
        dataset, num_replicas=world.size, rank=world.rank, shuffle=True, seed=cfg.seed * 100_003
    )


def _loader(dataset: Dataset, cfg: FitConfig, sampler, device: torch.device) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
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


def _resume_state(checkpoints: Checkpoints, fingerprint: str, world: World) -> dict | None:
    """Rank 0 picks the checkpoint to resume from (None: start fresh) and every
    rank gets its state, so all resume from the same one."""
    state = None
    if world.main:
        found = checkpoints.latest_good()
        if found is not None:
            path, state = found
            if state["fingerprint"] == fingerprint:
                print(f"resuming from {path} (epoch {state['epoch']})")
            else:
                print(
                    f"{checkpoints.folder}: checkpoints are from other params, data or code; "
                    "training from scratch"
                )
                checkpoints.clear()
                state = None
    return distributed.broadcast(state, world)


def _sync_bn(model: nn.Module, cfg: FitConfig, device: torch.device, world: World) -> None:
    """Swap BatchNorm for SyncBatchNorm in place when asked for and possible
    (several CUDA processes: PyTorch's SyncBatchNorm has no CPU kernel)."""
    if not world.distributed:
        return
    if cfg.sync_bn and device.type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(model)  # swaps the BN children in place
    elif cfg.sync_bn and world.main:
        print(
            "train.sync_bn: SyncBatchNorm needs CUDA; on CPU each process normalises "
            "over its own batch",
            file=sys.stderr,
        )


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
    world: World | None = None,
) -> dict:
    """Train ``model`` for ``cfg.epochs``, resuming from ``checkpoints`` when the
    newest loadable one carries the same ``fingerprint`` (else starting fresh).

    ``validate(model, epoch)`` returns metrics logged after each epoch;
    ``log(metrics, step)`` receives ``train/loss_*`` (``loss_total`` and each
    term) and ``train/lr`` every ``log_every`` steps, and the epoch means
    (``train_epoch/loss_*``) and validation metrics with step = epoch.
    ``extra_state`` (e.g. the MLflow run id) is stored in each checkpoint and
    returned as ``state["extra"]``. Returns the final state's summary.

    In a ``world`` of several processes the model is wrapped in DDP, each rank
    trains on its share of every batch, the logged losses are the mean over the
    ranks, and only rank 0 validates and writes checkpoints.
    """
    world = world or World()
    model.to(device)
    _sync_bn(model, cfg, device, world)  # before DDP wraps the modules
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sampler = _sampler(train_set, cfg, world)
    iters = math.ceil(len(sampler) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_factor(cfg.warmup_iters, iters, cfg.lr_steps, cfg.gamma)
    )
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    start_epoch, step, history, steps_log = 0, 0, [], []
    extra = dict(extra_state or {})
    state = _resume_state(checkpoints, fingerprint, world)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        rngs = state.get("rng_ranks") or [state["rng"]]
        torch.set_rng_state(rngs[world.rank] if world.rank < len(rngs) else state["rng"])
        start_epoch, step = state["epoch"], state["step"]
        history, extra = state["history"], state.get("extra", extra)
        steps_log = state.get("steps_log", [])
    else:  # a fresh start is seeded the same way, whatever was there before
        torch.manual_seed(cfg.seed + world.rank)  # ranks draw different flips and samples
    net: nn.Module = model
    if world.distributed:
        # Every parameter of the four variants gets a gradient at every step, even
        # on images without objects (tests/code/test_distributed.py checks it), so
        # DDP needs no find_unused_parameters graph walk.
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        sampler.set_epoch(epoch)
        sums: dict[str, float] = {}
        bar = tqdm(
            _loader(train_set, cfg, sampler, device),
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
                losses = net(images, targets, proposals) if proposals else net(images, targets)
            loss = sum(losses.values())
            # One host sync for all terms; under DDP the mean over the ranks, so every
            # rank sees the same numbers (and stops together on a non-finite one).
            terms = torch.stack([t.detach().float() for t in (loss, *losses.values())])
            means = distributed.mean(terms.tolist(), world, device)
            loss_value, values = means[0], dict(zip(losses, means[1:], strict=True))
            if not math.isfinite(loss_value):
                raise TrainingDiverged(
                    f"non-finite loss at epoch {epoch + 1}, step {step + 1}: {values}; the last "
                    f"good checkpoint is {checkpoints.latest() or 'none'} and no model was "
                    "written (lower train lr, or set clip_grad_norm?)"
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
                logged = {"train/loss_total": loss_value} | {
                    f"train/{k}": v for k, v in values.items()
                }
                logged["train/lr"] = opt.param_groups[0]["lr"]
                steps_log.append({"step": step, **logged})
                if log is not None:
                    log(logged, step)
        n = max(1, iters)
        record = {"epoch": epoch + 1, **{f"train_epoch/{k}": v / n for k, v in sums.items()}}
        last = epoch + 1 == cfg.epochs
        if world.main and validate is not None and ((epoch + 1) % cfg.eval_every == 0 or last):
            record.update(validate(model, epoch + 1))
        if log is not None:
            log({k: v for k, v in record.items() if k != "epoch"}, epoch + 1)
        history.append(record)
        if world.main:
            print(
                " ".join(
                    f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in record.items()
                )
            )
        rngs = distributed.gather(torch.get_rng_state(), world)
        if world.main:
            checkpoints.save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": rngs[0],
                    **({"rng_ranks": rngs} if world.distributed else {}),
                    "epoch": epoch + 1,
                    "step": step,
                    "history": history,
                    "steps_log": steps_log,
                    "fingerprint": fingerprint,
                    "extra": extra,
                },
                epoch + 1,
            )
        distributed.barrier(world)  # no rank runs ahead of the checkpoint it would resume from
    return {
        "epochs": cfg.epochs,
        "steps": step,
        "history": history,
        "steps_log": steps_log,
        "extra": extra,
    }


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
    """``fit``'s ``log`` for an MLflow run that already holds ``done``
    (:func:`unlogged`): one synchronous batched call per logged step, so every
    step logged before a checkpoint is stored when the checkpoint is written.
    (MLflow's asynchronous logging was tried: its flush before each checkpoint
    waited up to a second, more than all the synchronous calls of an epoch.)"""
    from rcnnops import tracking

    def log(metrics: dict[str, float], step: int | None = None) -> None:
        tracking.log_metrics(unlogged(metrics, step, done), step)

    return log


def save_model(model: nn.Module, out_dir: Path, meta: dict) -> None:
    """``model.pt`` (state dict) and ``model.json`` (meta), each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "model.pt.tmp"
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, out_dir / "model.pt")
    tmp = out_dir / "model.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out_dir / "model.json")


def _rebuild_hint(path: Path, variant: str) -> str:
    return (
        f"restore it from the DVC cache with `dvc checkout {path}`, or rebuild it with "
        f"`dvc repro -f train@{variant}`"
    )


def read_model_meta(model_dir: Path) -> dict:
    """``model.json`` of a trained model folder (``models/<variant>``)."""
    path = Path(model_dir) / "model.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no trained model here; train it with `dvc repro train@<variant>`"
        )
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        meta = e
    if not isinstance(meta, dict):
        why = f" ({meta})" if isinstance(meta, Exception) else ""
        raise CheckpointError(
            f"{path} is corrupt{why}: {_rebuild_hint(path, Path(model_dir).name)}"
        )
    return meta


def load_model(model_dir: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a trained model from ``model.json`` + ``model.pt`` (weights only).
    A truncated, garbage or mismatched ``model.pt`` raises :class:`CheckpointError`
    naming it and how to get it back."""
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
            f"{path}: cannot load model weights ({_describe(e)}); "
            + _rebuild_hint(path, meta["variant"])
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
    found = checkpoints.latest_good()
    if found is None or found[1]["fingerprint"] != fingerprint:
        return None
    return found[1].get("extra", {}).get("run_id")


def run(params, variant: str, progress: bool = True) -> dict:
    """The stage: train ``variant`` with ``params`` (a :class:`rcnnops.config.Params`);
    returns the model's meta (``model.json``).

    Under torchrun every process calls it (see :mod:`rcnnops.distributed`); rank 0
    returns the meta, the others an empty dict.
    """
    world = distributed.from_env()
    device = distributed.start(world, resolve_device(params.train.device))
    try:
        return _run(params, variant, world, device, progress and world.main)
    finally:
        distributed.stop(world)


def _run(params, variant: str, world: World, device: torch.device, progress: bool) -> dict:
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
    if world.distributed:  # it changes the numbers, so it is part of what was trained
        extra_hash |= {
            "world_size": world.size,
            "sync_bn": common.sync_bn and device.type == "cuda",
        }
    torch.manual_seed(common.seed)  # model initialisation
    model = build_model(variant, labels.num_classes + 1, vp.model)
    params_hash = stable_hash({"variant": variant, "train": vp, "seed": common.seed} | extra_hash)
    fingerprint = f"{params_hash}:{manifest['data_hash']}:{code_hash()}"
    out_dir = Path(common.out) / variant
    checkpoints = Checkpoints(out_dir / "checkpoints", rerun=f"dvc repro train@{variant}")
    cfg = FitConfig(
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
    )
    if not world.main:  # the other ranks train; rank 0 logs, validates and writes files
        fit(model, train_set, cfg, checkpoints, fingerprint, device, progress=False, world=world)
        return {}
    if world.distributed:
        print(
            f"data-parallel on {world.size} processes ({device.type}): global batch "
            f"{world.size * vp.batch_size} ({world.size} x {vp.batch_size}), "
            f"lr {vp.lr:g} x {world.size} = {cfg.lr:g}"
        )
    for stale in ("model.pt", "model.json"):  # as `dvc repro` does: a failed run leaves none
        (out_dir / stale).unlink(missing_ok=True)

    def validate(m: nn.Module, epoch: int) -> dict[str, float]:
        results, ms = predict(
            m, val_set, labels, device, params.evaluate.batch_size, progress=False
        )
        backend = params.evaluate.backend
        stats, _, _ = coco_evaluate(val_coco, results, "bbox", backend)
        if masks:
            stats |= coco_evaluate(val_coco, results, "segm", backend)[0]
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
        done = tracking.last_steps(run_id) if run_id else {}

        log = metric_logger(done)

        tracking.log_params(
            flatten(to_dict(vp), "train.")
            | {
                "variant": variant,
                "seed": common.seed,
                "device": str(device),
                "num_classes": labels.num_classes,
                "train_images": len(train_set),
                "val_images": len(val_set),
                "world_size": world.size,
                "lr_scaled": cfg.lr,
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
            log,
            {"run_id": active.info.run_id},
            progress,
            world,
        )
        if getattr(model, "classifier", None) == "svm":  # R-CNN's second stage
            plain = CocoDetection(train_coco, train_root, labels, proposals=train_props)
            counts = model.cpu().fit_svms(plain[i] for i in range(len(plain)))
            model.to(device)
            print(f"trained {len(counts)} per-class SVMs (+ ridge box regressors)")
            after = validate(model, cfg.epochs)
            print("with SVMs: " + " ".join(f"{k}={v:.4f}" for k, v in after.items()))
            log({k.replace("val/", "val_svm/"): v for k, v in after.items()})
        seconds = time.perf_counter() - t0
        log({"train_seconds": seconds})
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
        "world_size": world.size,
        "train_seconds": round(seconds, 2),
        "parameters": count_parameters(model),
        "epochs": summary["epochs"],
        "steps": summary["steps"],
        "final": summary["history"][-1] if summary["history"] else {},
    }
    save_model(model, out_dir, meta)
    return meta
