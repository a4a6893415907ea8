"""The solver: its settings (``FitConfig``), SGD with momentum, the
per-iteration LR schedule (linear warm-up, step decay), the training's precision
(:mod:`rcnnops.precision`) and its loss scaler (fp16 only)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from rcnnops.precision import Precision, resolve_amp


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
    amp: str | bool = "cuda"  # see rcnnops.precision: auto, bf16, fp16, fp32, cuda
    clip_grad_norm: float | None = 10.0
    seed: int = 0
    workers: int = 0
    log_every: int = 10
    eval_every: int = 1
    sync_bn: bool = False  # SyncBatchNorm across processes (CUDA only)
    # The validation metric that picks the epoch to keep (e.g. "val/bbox_AP"); None
    # keeps the last epoch. ``patience``: stop after that many validations in a row
    # without improving it.
    select: str | None = None
    patience: int | None = None


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
class Solver:
    """SGD with momentum on fp32 weights, the per-iteration LR schedule, the
    autocast precision and the loss scaler (enabled for fp16 only)."""

    params: list[nn.Parameter]
    opt: torch.optim.SGD
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    precision: Precision

    @classmethod
    def build(cls, model: nn.Module, cfg: FitConfig, iters: int, device: torch.device) -> Solver:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_factor(cfg.warmup_iters, iters, cfg.lr_steps, cfg.gamma)
        )
        precision = resolve_amp(cfg.amp, device)
        scaler = torch.amp.GradScaler(device.type, enabled=precision.scales_loss)
        return cls(params, opt, sched, scaler, precision)

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def step(self, loss: torch.Tensor, clip_grad_norm: float | None) -> None:
        """Backward, optional gradient clipping (on unscaled gradients), update."""
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if clip_grad_norm:
            self.scaler.unscale_(self.opt)
            nn.utils.clip_grad_norm_(self.params, clip_grad_norm)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
