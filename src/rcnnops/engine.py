"""The training loop, generic over the variants: each model returns a flat dict of
named losses (torchvision's detection API), and the loop sums, steps, logs,
validates and checkpoints. Resumes bit-exactly (CPU) from its own checkpoints.

``fit`` reads as its steps: build the solver, restore or seed, then per epoch
train the batches, validate, log and checkpoint.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from rcnnops import distributed
from rcnnops.checkpoints import Checkpoints, Progress, restore, resume_state, save_state
from rcnnops.data.dataset import collate
from rcnnops.distributed import World
from rcnnops.errors import UserError
from rcnnops.solver import FitConfig, Solver

Log = Callable[[dict[str, float], int | None], None]
Validate = Callable[[nn.Module, int], dict[str, float]]


class TrainingDiverged(UserError, RuntimeError):
    """A loss became NaN or infinite."""


def split_proposals(targets: list[dict]) -> list | None:
    """Take precomputed proposals out of the targets (they are a model input)."""
    if not targets or "proposals" not in targets[0]:
        return None
    return [t.pop("proposals") for t in targets]


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


def _to(device: torch.device, images: list, targets: list) -> tuple[list, list]:
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    return images, targets


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


def _wrap(model: nn.Module, device: torch.device, world: World) -> nn.Module:
    if not world.distributed:
        return model
    # Every parameter of the four variants gets a gradient at every step, even
    # on images without objects (tests/code/test_distributed.py checks it), so
    # DDP needs no find_unused_parameters graph walk.
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


@dataclass
class _Run:
    """One call of :func:`fit`: what every step needs."""

    net: nn.Module  # the model, DDP-wrapped under several processes
    solver: Solver
    cfg: FitConfig
    device: torch.device
    world: World
    checkpoints: Checkpoints
    log: Log | None


def _train_step(run: _Run, p: Progress, images: list, targets: list) -> tuple[float, dict]:
    """One batch: forward under the precision's autocast (none in fp32), loss
    check, backward and update.

    Returns the total loss and each term, as means over the ranks: one host sync
    for all terms, and every rank sees the same numbers (and stops together on a
    non-finite one)."""
    images, targets = _to(run.device, images, targets)
    proposals = split_proposals(targets)
    with run.solver.precision.autocast():
        losses = run.net(images, targets, proposals) if proposals else run.net(images, targets)
    loss = sum(losses.values())
    terms = torch.stack([t.detach().float() for t in (loss, *losses.values())])
    means = distributed.mean(terms.tolist(), run.world, run.device)
    loss_value, values = means[0], dict(zip(losses, means[1:], strict=True))
    if not math.isfinite(loss_value):
        raise TrainingDiverged(
            f"non-finite loss at epoch {p.epoch + 1}, step {p.step + 1}: {values}; the last "
            f"good checkpoint is {run.checkpoints.latest() or 'none'} and no model was "
            "written (lower train lr, or set clip_grad_norm?)"
        )
    run.solver.step(loss, run.cfg.clip_grad_norm)
    return loss_value, values


def _train_epoch(
    run: _Run, p: Progress, loader: DataLoader, bar_args: dict
) -> tuple[dict[str, float], float]:
    """Every batch of one epoch; logs every ``log_every`` steps; returns the loss
    sums and this process's training throughput in images/s (data loading and
    steps; validation and checkpoints excluded)."""
    sums: dict[str, float] = {}
    bar = tqdm(loader, **bar_args)
    seen, t0 = 0, time.perf_counter()
    for images, targets in bar:
        lr = run.solver.lr  # the step's own rate (the scheduler moves it after the step)
        loss_value, values = _train_step(run, p, images, targets)
        p.step += 1
        seen += len(images)
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.4f}")
        if p.step % run.cfg.log_every == 0:
            logged = {"train/loss_total": loss_value} | {f"train/{k}": v for k, v in values.items()}
            logged["train/lr"] = lr
            p.steps_log.append({"step": p.step, **logged})
            if run.log is not None:
                run.log(logged, p.step)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    return sums, seen / max(time.perf_counter() - t0, 1e-9)


def _end_epoch(
    run: _Run,
    p: Progress,
    model: nn.Module,
    sums: dict,
    speed: float,
    iters: int,
    validate: Validate | None,
) -> None:
    """Epoch means, validation (rank 0, every ``eval_every`` epochs and the last), logging."""
    epoch, cfg = p.epoch + 1, run.cfg
    record = {"epoch": epoch, **{f"train_epoch/{k}": v / max(1, iters) for k, v in sums.items()}}
    record["train_epoch/images_per_s"] = speed * run.world.size  # all processes together
    due = epoch % cfg.eval_every == 0 or epoch == cfg.epochs
    if run.world.main and validate is not None and due:
        record.update(validate(model, epoch))
        if cfg.select:
            p.improve(record, model, cfg.select)
    if run.log is not None:
        run.log({k: v for k, v in record.items() if k != "epoch"}, epoch)
    p.history.append(record)
    if run.world.main:
        print(
            " ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
            )
        )


def fit(
    model: nn.Module,
    train_set: Dataset,
    cfg: FitConfig,
    checkpoints: Checkpoints,
    fingerprint: str,
    device: torch.device,
    validate: Validate | None = None,
    log: Log | None = None,
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
    returned as ``state["extra"]``. Returns the final state's summary, with
    ``resumed_seconds``: the training time of the processes before this one, up to
    the checkpoint it resumed from (each checkpoint keeps the running total).

    In a ``world`` of several processes the model is wrapped in DDP, each rank
    trains on its share of every batch, the logged losses are the mean over the
    ranks, and only rank 0 validates and writes checkpoints.
    """
    world = world or World()
    model.to(device)
    _sync_bn(model, cfg, device, world)  # before DDP wraps the modules
    sampler = _sampler(train_set, cfg, world)
    iters = math.ceil(len(sampler) / cfg.batch_size)
    solver = Solver.build(model, cfg, iters, device)
    state = resume_state(checkpoints, fingerprint, world)
    p = restore(state, model, solver, cfg, world, dict(extra_state or {}), device)
    resumed, started = p.seconds, time.perf_counter()
    run = _Run(_wrap(model, device, world), solver, cfg, device, world, checkpoints, log)
    while p.epoch < cfg.epochs and not _stop_early(run, p):
        run.net.train()
        sampler.set_epoch(p.epoch)
        bar_args = {
            "total": iters,
            "disable": not progress,
            "desc": f"epoch {p.epoch + 1}/{cfg.epochs}",
            "unit": "batch",
            "leave": False,
        }
        sums, speed = _train_epoch(run, p, _loader(train_set, cfg, sampler, device), bar_args)
        _end_epoch(run, p, model, sums, speed, iters, validate)
        p.epoch += 1
        p.seconds = resumed + time.perf_counter() - started
        save_state(checkpoints, p, model, solver, fingerprint, device, world)
    return {
        "epochs": p.epoch,
        "steps": p.step,
        "history": p.history,
        "steps_log": p.steps_log,
        "extra": p.extra,
        "best": p.best,
        "resumed_seconds": resumed,  # trained before this call (by the checkpoint)
    }


def _stop_early(run: _Run, p: Progress) -> bool:
    """``patience`` validations in a row without a better ``select`` metric (rank 0
    decides; every rank stops together)."""
    patience = run.cfg.patience
    stop = bool(patience and p.best and p.best["stale"] >= patience)
    stop = distributed.broadcast(stop, run.world)
    if stop and run.world.main:
        print(
            f"early stop after epoch {p.epoch}: {run.cfg.select} has not improved on epoch "
            f"{p.best['epoch']}'s {p.best['value']:.4f} for {patience} validations"
        )
    return stop
