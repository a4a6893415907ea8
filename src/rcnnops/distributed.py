"""Data-parallel training under ``torchrun``: where this process stands in the
world, its process group, and the few collectives :mod:`rcnnops.train` needs.

``rcnnops train`` reads its place from torchrun's environment (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``). Without it the world has one process and nothing here
touches ``torch.distributed``, so a plain run is exactly the single-process code.
With ``train.nproc: N > 1`` and no torchrun around it, the command re-launches
itself as ``python -m torch.distributed.run --standalone --nproc_per_node N``
(the DVC stage command stays ``rcnnops train --variant V``).

Rules (see the README's "Scaling out"):

* ``batch_size`` is per process and ``lr`` is the rate for one process's batch;
  with N processes the global batch is N x ``batch_size`` and the learning rate
  is scaled linearly: ``lr x N`` (Goyal et al., 2017). ``warmup_iters`` stays in
  iterations (there are N times fewer per epoch), ``lr_steps`` in epochs.
* Rank 0 alone talks to MLflow, validates, and writes checkpoints and model
  files; every rank resumes from the state rank 0 loaded (it is broadcast, so the
  other ranks need not see the checkpoint folder).
* The backend is NCCL on CUDA (one GPU per process, ``LOCAL_RANK``), else gloo.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import torch

# Ranks other than 0 wait in a barrier while rank 0 validates and writes a
# checkpoint: the timeout must cover a validation pass, not just a collective.
TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class World:
    """This process's place: ``size`` processes, global ``rank``, ``local_rank``
    on its machine (its GPU index)."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs, validates and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def from_env(environ: Mapping[str, str] | None = None) -> World:
    """The world torchrun describes in ``environ`` (default ``os.environ``); a
    world of one when ``WORLD_SIZE`` is absent."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return World()
    try:
        world = World(int(env["WORLD_SIZE"]), int(env["RANK"]), int(env.get("LOCAL_RANK", 0)))
    except (KeyError, ValueError) as e:
        raise RuntimeError(
            "WORLD_SIZE is set but RANK/LOCAL_RANK are missing or not integers "
            f"({type(e).__name__}: {e}); start distributed training with torchrun"
        ) from None
    if not 0 <= world.rank < world.size:
        raise RuntimeError(f"RANK={world.rank} is outside WORLD_SIZE={world.size}")
    return world


def needs_launch(nproc: int, environ: Mapping[str, str] | None = None) -> bool:
    """True when ``train.nproc`` asks for several processes and this is not
    already one of them (an explicit torchrun's world always wins)."""
    env = os.environ if environ is None else environ
    return nproc > 1 and "WORLD_SIZE" not in env


def launch_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """``rcnnops ARGV`` as ``nproc`` processes on this machine, run by torchrun
    (``--standalone``: a local rendezvous on a free port) with this interpreter."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "rcnnops.cli",
        *argv,
    ]


def launch(nproc: int, argv: Sequence[str]) -> NoReturn:
    """Replace this process by torchrun running ``rcnnops ARGV`` ``nproc`` times,
    so that signals (a cancelled stage) reach torchrun, which stops its workers."""
    cmd = launch_command(nproc, argv)
    print("launching: " + " ".join(cmd[1:]), flush=True)
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


def scale_lr(lr: float, world_size: int) -> float:
    """Linear scaling: ``lr`` is for one process's batch; N processes step on an
    N times larger global batch."""
    return lr * world_size


def start(world: World, device: torch.device) -> torch.device:
    """Join the process group (a no-op for a world of one); returns this
    process's device (``cuda:LOCAL_RANK`` on GPUs)."""
    if not world.distributed:
        return device
    import torch.distributed as dist

    die_with_parent()
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {world.local_rank} has no GPU: {torch.cuda.device_count()} "
                "visible; lower train.nproc (or --nproc_per_node) to the number of GPUs"
            )
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # env:// rendezvous: MASTER_ADDR/PORT, RANK and WORLD_SIZE come from torchrun.
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=TIMEOUT,
            device_id=device if device.type == "cuda" else None,
        )
    return device


def die_with_parent() -> None:
    """Under torchrun on Linux: be killed when the agent that started us dies.

    torchrun starts each worker in a session of its own, so a SIGKILL of the
    stage command (the agent) would leave the workers training on, orphaned,
    and a rerun would race them for the checkpoints. SIGTERM is unaffected:
    torchrun forwards it to the workers itself."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return  # not a torchrun worker: leave other launchers' processes alone
    import ctypes
    import signal

    parent = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def stop(world: World) -> None:
    """Leave the process group (after the last collective)."""
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def broadcast(obj: Any, world: World) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; tensors arrive on the CPU)."""
    if not world.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, world: World) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def mean(values: list[float], world: World, device: torch.device) -> list[float]:
    """Element-wise mean of ``values`` over the ranks (float64). A NaN or inf on
    any rank reaches every rank, so all of them stop together."""
    if not world.distributed:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world.size).tolist()
