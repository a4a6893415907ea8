"""Prefect concurrency slots held across stages: a thread holds them (:class:`Held`),
a stage that ends hands them to the next of the flow's stages (:class:`Handover`),
and the first stage's are taken ahead, while the data stages run
(:class:`Reservation`). :mod:`pipelines.slots` decides which limits a stage needs
and when it runs; this module only keeps the slots.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator


class RunEnded(RuntimeError):
    """A stage stopped waiting for slots: its run is ending (Ctrl-C, a failure)."""


# The flow run's "ending" event, seen by its task threads (Prefect runs each task in
# a copy of the flow's context): None outside :func:`waits_end_with_the_run`.
_run_ending: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "rcnnops_run_ending", default=None
)


@contextlib.contextmanager
def waits_end_with_the_run() -> Iterator[None]:
    """Within it, a stage waiting for slots (its turn, a reservation, a limit
    another run holds) stops with :class:`RunEnded` once the block is left. When a
    run is interrupted or fails, Prefect joins its task threads before the process
    can exit, and a wait for a slot another run holds (or a killed run left held
    on a Prefect server) may never end: Ctrl-C would not stop the run."""
    ending = threading.Event()
    token = _run_ending.set(ending)
    try:
        yield
    finally:
        ending.set()
        _run_ending.reset(token)


def wait_for(
    ready: Callable[[float], bool],
    what: str,
    notice: Callable[[], object] | None = None,
    notice_after: float = 0.0,
) -> None:
    """Poll ``ready(timeout)`` until it is true; raise :class:`RunEnded` if the run
    ends meanwhile (see :func:`waits_end_with_the_run`). ``notice()`` is called
    once if the wait lasts ``notice_after`` seconds."""
    ending = _run_ending.get()
    notice_at = time.monotonic() + notice_after
    while not ready(0.1):
        if ending is not None and ending.is_set():
            raise RunEnded(f"the run ended while {what}")
        if notice is not None and time.monotonic() >= notice_at:
            notice()
            notice = None


class Held:
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
            wait_for(self._ready.wait, "waiting for Prefect concurrency slots")
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


class Handover:
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
    # How long a stage waits for its reservation before it says why it waits
    # (taking a free slot takes well under a second, up to 6 s with SQLite busy).
    NOTICE_SECONDS = 3.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[tuple, int] = {}
        self._idle: dict[tuple, list[Held]] = {}
        self._coming: dict[tuple, threading.Event] = {}  # a reservation being taken

    def coming(self, key: tuple, done: threading.Event) -> None:
        """A reservation (:class:`Reservation`) is being taken for ``key``."""
        with self._lock:
            self._coming[key] = done

    def arrived(self, key: tuple, held: Held | None, done: threading.Event) -> None:
        """The reservation is held (parked for the first stage) or failed (None)."""
        with self._lock:
            if held is not None:
                self._idle.setdefault(key, []).append(held)
            if self._coming.get(key) is done:
                del self._coming[key]
        done.set()

    def withdraw(self, key: tuple, held: Held) -> bool:
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

    def take(self, key: tuple, waiting: Callable[[], object] | None = None) -> Held | None:
        """The turn came: slots handed over (or reserved), if any. ``waiting()`` is
        called if the reservation has not arrived within ``NOTICE_SECONDS`` (another
        run holds the limit: the stage would otherwise wait without a word)."""
        with self._lock:
            self._waiting[key] -= 1
            coming = self._coming.get(key)
        if coming is not None:  # else the stage would ask Prefect for the slots reserved for it
            what = "waiting for the slots reserved for its first stage"
            wait_for(coming.wait, what, notice=waiting, notice_after=self.NOTICE_SECONDS)
        with self._lock:
            idle = self._idle.get(key)
            return idle.pop() if idle else None

    def give(self, key: tuple, held: Held) -> None:
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

    def _expire(self, key: tuple, held: Held) -> None:
        with self._lock:
            idle = self._idle.get(key, [])
            if held not in idle:
                return  # taken
            idle.remove(held)
        held.release()


class Reservation:
    """The first stage's Prefect slots for ``key``, asked for in the background
    after ``prepare()`` (see :func:`pipelines.slots.reserve`); :meth:`result`
    raises what preparing the limits raised."""

    # How long after asking for its slots a reservation given back while still being
    # taken is waited for (its slots are then given back at once). Taking a free
    # slot takes well under a second, up to 6 s when the server's SQLite is busy; a
    # reservation still waiting after that is waiting for a limit another run
    # holds, which can take any time, and then nothing was taken to give back.
    SETTLE_SECONDS = 10.0

    def __init__(
        self, key: tuple, limits: tuple[tuple[str, int], ...], prepare: Callable[[], object]
    ) -> None:
        self._key = key
        self._error: BaseException | None = None
        self._prepared = threading.Event()  # the limits exist (or preparing them failed)
        self._done = threading.Event()  # the slots are held (or taking them failed)
        self._lock = threading.Lock()
        self._abandoned = False
        self._held: Held | None = None
        self._asked: float | None = None  # when the slots were asked for (monotonic)
        handover.coming(self._key, self._done)
        context = contextvars.copy_context()  # Prefect's settings and the flow run
        self._thread = threading.Thread(
            target=context.run,
            args=(self._take, limits, prepare),
            name="rcnnops-slots-reserve",
            daemon=True,
        )
        self._thread.start()

    def _take(self, limits: tuple[tuple[str, int], ...], prepare: Callable[[], object]) -> None:
        try:
            prepare()
        except BaseException as e:
            self._error = e
            self._prepared.set()
            handover.arrived(self._key, None, self._done)
            return
        self._asked = time.monotonic()  # before result() returns: give_back reads it
        self._prepared.set()
        try:
            held = Held(limits)
        except BaseException:  # the first stage asks for itself (and meets it too)
            handover.arrived(self._key, None, self._done)
            return
        with self._lock:  # parked, or (the run is past needing it) given back
            if not self._abandoned:
                self._held = held
                handover.arrived(self._key, held, self._done)
                return
        handover.arrived(self._key, None, self._done)
        held.release()

    def result(self) -> None:
        """Wait for the limits to be prepared (not for the slots: another run may
        hold them, and the first stage says so while it waits); raise preparing's
        error, if any."""
        self._prepared.wait()
        if self._error is not None:
            raise self._error

    def give_back(self) -> None:
        """Give the slots back if no stage took them (nothing to train, or the
        run failed before training). A reservation still being taken is waited for
        until ``SETTLE_SECONDS`` after it asked, and gives them back as they come:
        while the run is still on, since the run's Prefect client is closed after
        it, and slots given back then would stay taken until their lease expired.
        One asked for longer ago waits for a limit another run holds, and is not
        waited for: Ctrl-C then stops the run at once."""
        with self._lock:
            self._abandoned = True
            held = self._held
        if held is None:
            asked = self._asked if self._asked is not None else time.monotonic()
            self._thread.join(max(0.0, asked + self.SETTLE_SECONDS - time.monotonic()))
        elif handover.withdraw(self._key, held):
            held.release()


handover = Handover()
