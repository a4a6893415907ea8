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
import contextvars
import fcntl
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipelines import gpus as gpu_leases
from pipelines import local_api

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
    :class:`_Handover`): consecutive stages ask Prefect once."""
    limits = _limits(slots)
    key = (slots.parallel, limits)
    gate = _gate(slots.parallel)
    _handover.expect(key)
    try:
        gate.acquire()
    except BaseException:
        _handover.expect(key, -1)
        raise
    held = None
    try:
        held = _handover.take(key)
        if held is None:
            if busy := _taken(slots):
                log.info("%s waits for a slot: %s (held by other runs)", stage, busy)
            held = _Held(limits)
        yield
    finally:
        if held is not None:
            _handover.give(key, held)  # before the next stage gets its turn
        gate.release()


class Reservation:
    """The first stage's Prefect slots, asked for in the background (see
    :func:`reserve`); :meth:`result` raises what preparing the limits raised."""

    def __init__(self, slots: Slots) -> None:
        self._key = (slots.parallel, _limits(slots))
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._abandoned = False
        self._held: _Held | None = None
        _handover.coming(self._key, self._done)
        context = contextvars.copy_context()  # Prefect's settings and the flow run
        thread = threading.Thread(
            target=context.run, args=(self._take, slots), name="rcnnops-slots-reserve", daemon=True
        )
        thread.start()

    def _take(self, slots: Slots) -> None:
        try:
            if reclaimed := ensure_limits(slots):
                print(f"reclaimed {reclaimed} concurrency slot(s) that a killed run left held")
            held = _Held(_limits(slots))
        except BaseException as e:  # the first stage asks for itself (and meets it too)
            self._error = e
            _handover.arrived(self._key, None, self._done)
            return
        with self._lock:  # parked, or (the run is past needing it) given back
            if not self._abandoned:
                self._held = held
                _handover.arrived(self._key, held, self._done)
                return
        _handover.arrived(self._key, None, self._done)
        held.release()

    def result(self) -> None:
        """Wait for the limits to be prepared; raise their error, if any."""
        self._done.wait()
        if self._error is not None:
            raise self._error

    def give_back(self) -> None:
        """Give the slots back if no stage took them (nothing to train, or the
        run failed before training); a reservation still waiting for Prefect gives
        them back as soon as they come."""
        with self._lock:
            self._abandoned = True
            held = self._held
        if held is not None and _handover.withdraw(self._key, held):
            held.release()


@contextlib.contextmanager
def reserve(slots: Slots) -> Iterator[Reservation]:
    """Prepare the limits (:func:`ensure_limits`) and take the first stage's Prefect
    slots now, in the background, while the data stages run: the first training
    then starts on them without asking the API. Asking right after a task ends
    often meets the server's SQLite busy recording it (503, then the client's 2 s
    retry: see :class:`_Handover`). Slots no stage took are given back at exit."""
    reservation = Reservation(slots)
    try:
        yield reservation
    finally:
        reservation.give_back()


class _Held:
    """Prefect concurrency slots held by a thread of their own, so that the stage
    that took them can hand them to the next one.

    The thread holds Prefect's ``concurrency`` context (which renews the lease)
    until :meth:`release`. A failed lease renewal is logged by Prefect and the
    stage goes on (a training is not killed for an API outage; the limit may then
    be exceeded until the stage ends)."""

    def __init__(self, limits: tuple[tuple[str, int], ...]) -> None:
        self._ready, self._release = threading.Event(), threading.Event()
        self._error: BaseException | None = None
        context = contextvars.copy_context()  # Prefect's settings (the API in use)
        self._thread = threading.Thread(
            target=context.run, args=(self._hold, limits), name="rcnnops-slots", daemon=True
        )
        self._thread.start()
        try:
            while not self._ready.wait(0.5):  # a wait a cancelled task can leave
                pass
        except BaseException:
            self._release.set()  # given back as soon as they come
            raise
        if self._error is not None:
            self._thread.join()
            raise self._error

    def _hold(self, limits: tuple[tuple[str, int], ...]) -> None:
        from prefect.concurrency.sync import concurrency

        try:
            with contextlib.ExitStack() as held:
                for name, occupy in limits:
                    held.enter_context(
                        concurrency(
                            name, occupy=occupy, strict=True, raise_on_lease_renewal_failure=False
                        )
                    )
                self._ready.set()
                self._release.wait()
        except BaseException as e:
            if not self._ready.is_set():
                self._error = e
            else:  # giving back failed: the limit's lease expiry (or reclaim) frees it
                logging.getLogger(__name__).warning("giving back concurrency slots failed: %s", e)
        finally:
            self._ready.set()

    def release(self) -> None:
        self._release.set()
        self._thread.join()


class _Handover:
    """This process's Prefect slots passed from a stage that ends to the next of
    its stages waiting for the same limits, instead of given back and asked for
    again.

    Asking again right after a stage ends often meets the server's SQLite busy
    with the ended task's records: Prefect's API then answers 503 and its client
    retries after 2 s, then 4 s more (seen as 2-7 s gaps between stages). Another
    run waiting for the limit polls at intervals of up to 30 s, so giving the slot
    back only to take it again a moment later did not give it a turn either. A
    slot parked for a waiter that never takes it is given back after
    ``IDLE_SECONDS``."""

    IDLE_SECONDS = 10.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[tuple, int] = {}
        self._idle: dict[tuple, list[_Held]] = {}
        self._coming: dict[tuple, threading.Event] = {}  # a reservation being taken

    def coming(self, key: tuple, done: threading.Event) -> None:
        """A reservation (:class:`Reservation`) is being taken for ``key``."""
        with self._lock:
            self._coming[key] = done

    def arrived(self, key: tuple, held: _Held | None, done: threading.Event) -> None:
        """The reservation is held (parked for the first stage) or failed (None)."""
        with self._lock:
            if held is not None:
                self._idle.setdefault(key, []).append(held)
            if self._coming.get(key) is done:
                del self._coming[key]
        done.set()

    def withdraw(self, key: tuple, held: _Held) -> bool:
        """Take parked slots back out (True if they were still parked)."""
        with self._lock:
            idle = self._idle.get(key, [])
            if held in idle:
                idle.remove(held)
                return True
            return False

    def expect(self, key: tuple, n: int = 1) -> None:
        """A stage waits for its turn (``n=-1``: it stopped waiting without one)."""
        with self._lock:
            self._waiting[key] = self._waiting.get(key, 0) + n

    def take(self, key: tuple) -> _Held | None:
        """The turn came: slots handed over (or reserved), if any."""
        with self._lock:
            self._waiting[key] -= 1
            coming = self._coming.get(key)
        if coming is not None:
            coming.wait()  # else the stage would ask Prefect for the slots reserved for it
        with self._lock:
            idle = self._idle.get(key)
            return idle.pop() if idle else None

    def give(self, key: tuple, held: _Held) -> None:
        """A stage ended: park its slots for a waiting stage, or give them back."""
        with self._lock:
            idle = self._idle.setdefault(key, [])
            keep = self._waiting.get(key, 0) > len(idle)
            if keep:
                idle.append(held)
        if not keep:
            held.release()
            return
        timer = threading.Timer(self.IDLE_SECONDS, self._expire, (key, held))
        timer.daemon = True
        timer.start()

    def _expire(self, key: tuple, held: _Held) -> None:
        with self._lock:
            idle = self._idle.get(key, [])
            if held not in idle:
                return  # taken
            idle.remove(held)
        held.release()


_handover = _Handover()


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
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(STAGES_LIMIT, slots.parallel)
        if slots.on_gpu:
            client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, slots.gpus)
        if PREFECT_API_URL.value() and not local_api.running():
            return 0  # a Prefect server: its repossessor expires leases
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
