"""Training checkpoints: ``epoch_NNNN.pt`` files, written atomically, from which an
interrupted training resumes when its fingerprint (params + data + code) matches;
what one holds (weights, solver, every rank's generators, :class:`Progress`) and
how the training loop (:mod:`rcnnops.engine`) saves and restores it across ranks.

The folder is deliberately not a DVC output (DVC would delete it before a rerun).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rcnnops import distributed
from rcnnops.distributed import World
from rcnnops.models.io import CheckpointError, describe_load_error

if TYPE_CHECKING:
    from rcnnops.solver import FitConfig, Solver


def code_hash() -> str:
    """sha256 of the package's Python sources: a checkpoint made by other code
    (a changed model, loss or sampler) must not be resumed as if it were ours."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


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
            why = describe_load_error(e)
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

    def resumable(self, fingerprint: str) -> dict | None:
        """The newest good checkpoint's state if it was made with ``fingerprint``."""
        found = self.latest_good()
        if found is None or found[1]["fingerprint"] != fingerprint:
            return None
        return found[1]

    def clear(self) -> None:
        if self.folder.exists():
            shutil.rmtree(self.folder)

    def _from_scratch(self) -> str:
        how = f"delete {self.folder} to train from scratch"
        return how + (f" (then `{self.rerun}`)" if self.rerun else "")


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's generator states: the CPU's, and the CUDA device's when
    training on one (dropout, samplers and random init draw from both there)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(checkpoint: dict, rank: int, device: torch.device) -> None:
    """Restore ``rank``'s generators from a checkpoint (its CUDA one when the
    checkpoint has it and this training is on CUDA: a CPU resume of a GPU
    checkpoint continues, but is not bit-exact, and says so)."""
    cpu = checkpoint.get("rng_ranks") or [checkpoint["rng"]]
    torch.set_rng_state(cpu[rank] if rank < len(cpu) else checkpoint["rng"])
    cuda = checkpoint.get("cuda_rng_ranks")
    if cuda and device.type == "cuda":
        torch.cuda.set_rng_state(cuda[rank] if rank < len(cuda) else cuda[0], device)
    elif cuda and rank == 0:
        print("the checkpoint was made on CUDA: resuming on the CPU is not bit-exact")


@dataclass
class Progress:
    """Where training is: what a checkpoint stores besides weights and solver."""

    epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    steps_log: list[dict] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    best: dict[str, Any] = field(default_factory=dict)  # epoch, value, model, stale
    seconds: float = 0.0  # training time up to this checkpoint, across resumes

    def improve(self, record: dict, model: nn.Module, key: str) -> None:
        """Remember the weights of the best validated epoch by ``key`` (higher is
        better) and count the validations since it."""
        value = record.get(key)
        if value is None:
            return
        if "value" not in self.best or value > self.best["value"]:
            weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            self.best = {"epoch": record["epoch"], "value": value, "model": weights, "stale": 0}
        else:
            self.best["stale"] += 1


def resume_state(checkpoints: Checkpoints, fingerprint: str, world: World) -> dict | None:
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


def restore(
    state: dict | None,
    model: nn.Module,
    solver: Solver,
    cfg: FitConfig,
    world: World,
    extra: dict,
    device: torch.device,
) -> Progress:
    """Load a checkpoint's weights, solver, RNG and progress; or seed a fresh start
    the same way whatever was there before."""
    if state is None:
        torch.manual_seed(cfg.seed + world.rank)  # ranks draw different flips and samples
        return Progress(extra=extra)
    model.load_state_dict(state["model"])
    solver.opt.load_state_dict(state["optimizer"])
    solver.sched.load_state_dict(state["scheduler"])
    solver.scaler.load_state_dict(state["scaler"])
    set_rng_state(state, world.rank, device)
    return Progress(
        state["epoch"],
        state["step"],
        state["history"],
        state.get("steps_log", []),
        state.get("extra", extra),
        state.get("best", {}),
        float(state.get("seconds", 0.0)),  # checkpoints before it was kept: 0
    )


def save_state(
    checkpoints: Checkpoints,
    p: Progress,
    model: nn.Module,
    solver: Solver,
    fingerprint: str,
    device: torch.device,
    world: World,
) -> None:
    """Rank 0 saves weights, solver, every rank's RNGs (CPU, and CUDA on a GPU) and
    the progress; no rank runs ahead of the checkpoint it would resume from."""
    rngs = distributed.gather(rng_state(device), world)
    if world.main:
        cpu_rngs = [r["cpu"] for r in rngs]
        state = {
            "model": model.state_dict(),
            "optimizer": solver.opt.state_dict(),
            "scheduler": solver.sched.state_dict(),
            "scaler": solver.scaler.state_dict(),
            "rng": cpu_rngs[0],
            **({"rng_ranks": cpu_rngs} if world.distributed else {}),
            **({"cuda_rng_ranks": [r["cuda"] for r in rngs]} if "cuda" in rngs[0] else {}),
            "precision": solver.precision.name,
            "epoch": p.epoch,
            "step": p.step,
            "history": p.history,
            "steps_log": p.steps_log,
            "fingerprint": fingerprint,
            "extra": p.extra,
            "best": p.best,
            "seconds": p.seconds,
        }
        checkpoints.save(state, p.epoch)
    distributed.barrier(world)
