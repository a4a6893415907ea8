"""How many variants train at once, and Prefect's concurrency limits that hold it.

Two global concurrency limits on the Prefect API gate every training and
evaluation stage the flow runs:

* ``rcnnops-stages``: ``pipeline.parallel`` slots ("auto": one per GPU, 1 on a
  CPU, where one training already keeps every core busy);
* ``gpu``: one slot per visible GPU, taken only by stages that run on CUDA, so a
  GPU is never given two trainings whatever ``parallel`` says. A DDP training
  (``train.nproc`` processes) takes that many GPU slots.

The limits count; which GPUs a stage gets is a lease (:mod:`pipelines.gpus`),
taken once its slots are held and passed as ``CUDA_VISIBLE_DEVICES``.

The limits live on the Prefect API (the ephemeral one by default, or a server
shared by several flow runs and workers, which then share the GPUs fairly).
A stage refused a slot there polls again after Prefect's ``Retry-After`` (up to
30 s, from the limit's average occupancy), so the flow's own stages first queue
in-process (:func:`hold`): each starts the moment the one before it ends, on the
Prefect slots that one hands over, and only runs of other flows are waited for
by polling.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipelines import gpus as gpu_leases
from pipelines import local_api
from pipelines.held_slots import Held, Reservation, handover, wait_for

STAGES_LIMIT = "rcnnops-stages"
GPU_LIMIT = "gpu"


@dataclass(frozen=True)
class Slots:
    """What one stage occupies: limit names, GPU slots, CPU threads per stage;
    ``gpu_ids``: the GPUs the flow sees (a stage leases ``gpus_per_stage`` of them)."""

    parallel: int
    gpu_ids: tuple[str, ...]
    on_gpu: bool
    gpus_per_stage: int = 1

    @property
    def gpus(self) -> int:
        return len(self.gpu_ids)

    @property
    def names(self) -> list[str]:
        return [STAGES_LIMIT] + ([GPU_LIMIT] if self.on_gpu else [])

    def threads(self, cpus: int | None = None) -> dict[str, str]:
        """``OMP_NUM_THREADS`` for a CPU stage when several run at once (so two
        trainings share the cores instead of fighting over them); empty otherwise."""
        if self.on_gpu or self.parallel <= 1:
            return {}
        per_stage = max(1, (cpus or os.cpu_count() or 1) // self.parallel)
        return {"OMP_NUM_THREADS": str(per_stage)}


def plan(
    parallel: int | str, device: str, nproc: int = 1, gpu_ids: Sequence[str] | None = None
) -> Slots:
    """The slots for ``pipeline.parallel`` and ``train.device`` on this machine
    (``gpu_ids``: default the visible GPUs, :func:`pipelines.gpus.visible_gpu_ids`)."""
    ids = tuple(gpu_leases.visible_gpu_ids() if gpu_ids is None else gpu_ids)
    on_gpu = len(ids) > 0 and device != "cpu"
    if parallel == "auto":
        parallel = max(1, len(ids) // max(nproc, 1)) if on_gpu else 1
    return Slots(int(parallel), ids, on_gpu, max(nproc, 1))


def _limits(slots: Slots) -> tuple[tuple[str, int], ...]:
    """The Prefect limits one stage occupies, and how many slots of each."""
    return ((STAGES_LIMIT, 1),) + (((GPU_LIMIT, slots.gpus_per_stage),) if slots.on_gpu else ())


_gates: dict[int, threading.BoundedSemaphore] = {}
_gates_lock = threading.Lock()


def _gate(parallel: int) -> threading.BoundedSemaphore:
    """This process's queue for ``parallel`` stages at once (the flow's tasks are
    threads of it)."""
    with _gates_lock:
        return _gates.setdefault(parallel, threading.BoundedSemaphore(parallel))


@contextlib.contextmanager
def hold(slots: Slots, stage: str, log: logging.Logger | logging.LoggerAdapter) -> Iterator[None]:
    """Hold one stage's slots: this flow's turn (in-process), then the Prefect
    limits shared with other runs, saying so when those are all taken.

    A stage that ends while another of this flow's stages waits for its turn
    hands its Prefect slots over instead of giving them back (see
    :class:`pipelines.held_slots.Handover`): consecutive stages ask Prefect once."""
    limits = _limits(slots)
    key = (slots.parallel, limits)
    gate = _gate(slots.parallel)
    handover.expect(key)
    try:
        wait_for(lambda t: gate.acquire(timeout=t), f"{stage} waited for its turn")
    except BaseException:
        handover.expect(key, -1)
        raise
    held = None
    try:
        held = handover.take(key, waiting=lambda: _say_waiting(slots, stage, log))
        if held is None:
            _say_waiting(slots, stage, log)
            held = Held(limits)
        yield
    finally:
        if held is not None:
            handover.give(key, held)  # before the next stage gets its turn
        gate.release()


@contextlib.contextmanager
def reserve(slots: Slots) -> Iterator[Reservation]:
    """Prepare the limits (:func:`ensure_limits`) and take the first stage's Prefect
    slots now, in the background, while the data stages run: the first training
    then starts on them without asking the API. Asking right after a task ends
    often meets the server's SQLite busy recording it (503, then the client's 2 s
    retry: see :class:`pipelines.held_slots.Handover`). Slots no stage took are
    given back at exit."""

    def prepare() -> None:
        if reclaimed := ensure_limits(slots):
            print(f"reclaimed {reclaimed} concurrency slot(s) that a killed run left held")

    limits = _limits(slots)
    reservation = Reservation((slots.parallel, limits), limits, prepare)
    try:
        yield reservation
    finally:
        reservation.give_back()


def _say_waiting(slots: Slots, stage: str, log: logging.Logger | logging.LoggerAdapter) -> None:
    """Log that ``stage`` waits for slots other runs hold, if they are all taken.
    On a Prefect server, the slots of a run killed while its server was down or
    restarted, or of a run killed on a temporary local API sharing the server's
    database, are held for good (their lease is gone with that server's memory):
    the message says how to free them."""
    if not (busy := _taken(slots)):
        return
    hint = ""
    if _on_a_server():
        free = " and ".join(f"`prefect gcl update {n} --active-slots 0`" for n, _ in _limits(slots))
        hint = f"; if no other run is on, a killed run left them held: free them with {free}"
    log.info("%s waits for a slot: %s (held by other runs)%s", stage, busy, hint)


def _on_a_server() -> bool:
    """Whether the flow runs on a Prefect server (``PREFECT_API_URL``), not on the
    temporary local API of this run."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value()) and not local_api.running()


def _taken(slots: Slots) -> str:
    """The limits this stage needs that are full right now ("" if none or not known)."""
    from prefect import get_client

    need = {STAGES_LIMIT: 1} | ({GPU_LIMIT: slots.gpus_per_stage} if slots.on_gpu else {})
    full = []
    try:
        with get_client(sync_client=True) as client:
            for name, n in need.items():
                limit = client.read_global_concurrency_limit_by_name(name)
                if limit.active_slots + n > limit.limit:
                    full.append(f"{name} {limit.active_slots} of {limit.limit}")
    except Exception:  # only a message: the acquisition itself reports real errors
        return ""
    return ", ".join(full)


def ensure_limits(slots: Slots) -> int:
    """Create or resize the global concurrency limits on the Prefect API; on the
    ephemeral local API, first reclaim the slots killed runs left held (see
    :func:`reclaim_leaked_slots`). Returns how many were reclaimed."""
    from prefect import get_client
    from prefect.settings import PREFECT_HOME

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(STAGES_LIMIT, slots.parallel)
        if slots.on_gpu:
            client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, slots.gpus)
        if _on_a_server():
            return 0  # its repossessor expires leases
        return reclaim_leaked_slots(client, Path(PREFECT_HOME.value()) / FLOWS_LOCK)


FLOWS_LOCK = "rcnnops-flows.lock"
_flows_fd: int | None = None  # this process's shared hold on the flows lock


def reclaim_leaked_slots(client, lock: Path) -> int:
    """Give back the slots of runs that were killed while holding them.

    Prefect keeps a slot's lease in the server's memory, and the ephemeral API is
    a temporary server per process that runs no lease-expiry service: a run
    killed (SIGKILL, OOM, power) while training leaves its slot counted in the
    database for good, and every later run would wait for it forever. So each
    flow process holds a shared ``flock`` on ``lock`` (beside Prefect's database)
    for its life; a process that can take it exclusively is the only rcnnops
    flow on this API, so every slot still counted is a dead run's and is reset.
    With other flows running, nothing is touched (their slots are real). Returns
    the number of slots reclaimed."""
    global _flows_fd
    if _flows_fd is None:
        lock.parent.mkdir(parents=True, exist_ok=True)
        _flows_fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(_flows_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        alone = True
    except BlockingIOError:
        alone = False
    reclaimed = 0
    try:
        if alone:
            for name in (STAGES_LIMIT, GPU_LIMIT):
                reclaimed += _reset(client, name)
    finally:
        fcntl.flock(_flows_fd, fcntl.LOCK_SH)  # held until this process exits
    return reclaimed


def _reset(client, name: str) -> int:
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    try:
        held = client.read_global_concurrency_limit_by_name(name).active_slots
    except ObjectNotFound:
        return 0
    if held:
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=0))
    return held
