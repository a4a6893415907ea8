"""Device assignment on a simulated multi-GPU machine: the flow's stages hold
Prefect GPU slots and a lease on which GPUs, and run with exactly those in
``CUDA_VISIBLE_DEVICES``. No CUDA is launched: each stage's environment is
recorded instead of running ``dvc repro``. The lease tests run in ``make test``;
the flow tests (a Prefect test server, ~45 s) in the scale suite (``-m scale``,
part of ``make test-ci``)."""

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from prefect import flow
from prefect.futures import wait

from pipelines import gpus, slots
from rcnnops import project as dvcproj

FOUR = ["0", "1", "2", "3"]


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(autouse=True)
def leases(tmp_path, monkeypatch):
    """A lease folder of this test's own (the machine's is left alone)."""
    monkeypatch.setenv(gpus.LEASES_ENV, str(tmp_path / "leases"))
    return tmp_path / "leases"


def test_visible_gpu_ids_follow_cuda_visible_devices(monkeypatch):
    assert gpus.visible_gpu_ids({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert gpus.visible_gpu_ids({"CUDA_VISIBLE_DEVICES": "GPU-ab12, GPU-cd34"}) == [
        "GPU-ab12",
        "GPU-cd34",
    ]
    assert gpus.visible_gpu_ids({"CUDA_VISIBLE_DEVICES": "0,-1,1"}) == ["0"]  # as CUDA reads it
    assert gpus.visible_gpu_ids({"CUDA_VISIBLE_DEVICES": ""}) == []
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi: no GPU
    assert gpus.visible_gpu_ids({}) == []


def test_slots_default_to_one_stage_on_a_cpu_and_one_per_gpu():
    cpu = slots.plan("auto", "auto", gpu_ids=[])
    assert (cpu.parallel, cpu.on_gpu, cpu.names) == (1, False, [slots.STAGES_LIMIT])
    gpu = slots.plan("auto", "auto", gpu_ids=FOUR)
    assert (gpu.parallel, gpu.gpus, gpu.on_gpu) == (4, 4, True)
    assert gpu.names == [slots.STAGES_LIMIT, slots.GPU_LIMIT]
    ddp = slots.plan("auto", "cuda", nproc=2, gpu_ids=FOUR)
    assert (ddp.parallel, ddp.gpus_per_stage) == (2, 2)
    forced_cpu = slots.plan(3, "cpu", gpu_ids=FOUR)
    assert (forced_cpu.parallel, forced_cpu.on_gpu) == (3, False)
    assert forced_cpu.threads(cpus=6) == {"OMP_NUM_THREADS": "2"}


def test_leases_are_exclusive_and_all_or_nothing(leases):
    with gpus.lease(1, "a", FOUR) as a, gpus.lease(2, "b", FOUR) as b:
        assert a == ["0"] and b == ["1", "2"]
        busy = r"c: no 2 free GPU\(s\).*GPU 0: pid \d+ \(a\)"
        with pytest.raises(gpus.LeaseTimeout, match=busy), gpus.lease(2, "c", FOUR, 0.3, 0.05):
            pass
        with gpus.lease(1, "d", FOUR) as d:  # the failed attempt held nothing
            assert d == ["3"]
    with gpus.lease(4, "e", FOUR) as e:  # everything was released
        assert e == FOUR
    with (
        pytest.raises(gpus.LeaseTimeout, match="needs 5 GPU.*4 are visible"),
        gpus.lease(5, "f", FOUR),
    ):
        pass


def test_a_killed_holder_frees_its_gpu(leases):
    """SIGKILL gives no chance to clean up: the kernel drops the flock."""
    code = (
        "import sys, time; from pipelines import gpus\n"
        "with gpus.lease(1, 'victim', ['0', '1']) as ids:\n"
        "    print(ids[0], flush=True); time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().strip() == "0"
        assert gpus.holders(["0", "1"])["0"]["stage"] == "victim"
        with gpus.lease(1, "next", ["0", "1"]) as ids:
            assert ids == ["1"]  # GPU 0 is the victim's
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        with gpus.lease(2, "after", ["0", "1"], timeout=5) as ids:
            assert ids == ["0", "1"]
    finally:
        proc.kill()
        proc.wait()


# --- the flow's stages on a simulated 4-GPU machine ------------------------------


class Recorder:
    """Stands in for ``dvc repro``: records each stage's GPUs and time span."""

    def __init__(self, seconds: float, kill_first: float = 0.0, together: int = 0) -> None:
        """``kill_first``: the first training to start dies after that many seconds
        (whichever variant Prefect happens to start first). ``together``: trainings
        wait for that many to be running (a barrier, so the test knows they ran at
        once whatever Prefect's scheduling jitter)."""
        self.seconds, self.kill_first = seconds, kill_first
        self.barrier = threading.Barrier(together, timeout=90) if together else None
        self.runs: list[dict] = []
        self.started = 0
        self.two_started = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, project, stages, force=False, extra_env=None):
        for stage in stages:
            self._one(stage, extra_env)
        return list(stages)

    def _one(self, stage, extra_env):
        with self.lock:  # start order and start times agree
            start = time.monotonic()
            self.started += stage.startswith("train@")
            first = stage.startswith("train@") and self.started == 1
            if self.started == 2:
                self.two_started.set()
        if first and self.kill_first:
            # dies while the second holds the other GPU, whatever the scheduling jitter
            assert self.two_started.wait(timeout=90), "the second training never started"
            time.sleep(self.kill_first)
            self._record(stage, extra_env, start)
            raise subprocess.CalledProcessError(-signal.SIGKILL, ["dvc", "repro", stage])
        if stage.startswith("train@"):
            if self.barrier is not None:
                self.barrier.wait()  # BrokenBarrierError: fewer ran at once than expected
            time.sleep(self.seconds)
        self._record(stage, extra_env, start)

    def _record(self, stage, env, start):
        gpus_seen = (env or {}).get("CUDA_VISIBLE_DEVICES", "")
        with self.lock:
            self.runs.append(
                {"stage": stage, "gpus": gpus_seen.split(","), "start": start,
                 "end": time.monotonic()}
            )  # fmt: skip

    def trains(self) -> list[dict]:
        return [r for r in self.runs if r["stage"].startswith("train@")]


def _run_stages(tmp_path, variants, plan):
    from pipelines.retrain import train_and_evaluate

    @flow(name="gpu-assignment")
    def stages():
        slots.ensure_limits(plan)
        futures = [train_and_evaluate.submit(str(tmp_path), v, plan) for v in variants]
        wait(futures)
        return [f.state for f in futures]

    return stages()


def _overlap(a: dict, b: dict) -> bool:
    return max(a["start"], b["start"]) < min(a["end"], b["end"])


VARIANTS = ["rcnn", "fast_rcnn", "faster_rcnn", "mask_rcnn"]


def test_one_stage_at_a_time_queues_in_the_flow_not_on_prefect(harness, tmp_path, monkeypatch):
    """On a CPU (one stage at a time) the flow's own stages queue in-process, and
    each hands its Prefect slot to the next: Prefect is asked once for the three
    stages (no stage polls Prefect, whose Retry-After is up to 30 s, for a slot its
    own flow holds, nor meets the 2 s retry of a busy SQLite), and the slot is given
    back when the last one ends."""
    import prefect.concurrency.sync

    real, inside, asked_while_inside = prefect.concurrency.sync.concurrency, [], []
    lock = threading.Lock()

    @contextlib.contextmanager
    def recording(*args, **kwargs):
        with lock:  # how many of the flow's stages were asking for or holding a slot
            asked_while_inside.append(len(inside))
            inside.append(1)
        try:
            with real(*args, **kwargs):
                yield
        finally:
            with lock:
                inside.pop()

    monkeypatch.setattr(prefect.concurrency.sync, "concurrency", recording)
    rec = Recorder(seconds=1.0)
    monkeypatch.setattr(dvcproj, "repro", rec)
    plan = slots.plan("auto", "cpu", gpu_ids=())
    states = _run_stages(tmp_path, VARIANTS[:3], plan)
    assert all(s.is_completed() for s in states)
    trains = rec.trains()
    assert len(trains) == 3
    assert not any(_overlap(a, b) for a in trains for b in trains if a is not b)
    assert asked_while_inside == [0]
    from prefect import get_client

    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(slots.STAGES_LIMIT).active_slots == 0


def test_the_first_stage_starts_on_slots_reserved_beside_the_data_stages(
    harness, tmp_path, monkeypatch
):
    """The flow takes the first training's slot while the data stages run (asked
    for right after a task ends, it often met the server's SQLite busy: a 503 and
    the client's 2 s retry between stages): Prefect is asked once, before any
    stage starts, and the slot is given back when the last one ends. A
    reservation no stage takes (nothing to train) is given back at exit."""
    import prefect.concurrency.sync
    from prefect import get_client

    real, asked = prefect.concurrency.sync.concurrency, []

    @contextlib.contextmanager
    def recording(*args, **kwargs):
        asked.append(time.monotonic())
        with real(*args, **kwargs):
            yield

    monkeypatch.setattr(prefect.concurrency.sync, "concurrency", recording)
    rec = Recorder(seconds=0.5)
    monkeypatch.setattr(dvcproj, "repro", rec)
    plan = slots.plan("auto", "cpu", gpu_ids=())

    def active() -> int:
        with get_client(sync_client=True) as client:
            return client.read_global_concurrency_limit_by_name(slots.STAGES_LIMIT).active_slots

    @flow(name="reserved-first")
    def stages(variants: list[str]) -> list:
        with slots.reserve(plan) as first:
            first.result()  # the limits exist; the slot is being taken in the background
            deadline = time.monotonic() + 10
            while (held_before_stages := active()) == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            futures = [train_and_evaluate.submit(str(tmp_path), v, plan) for v in variants]
            wait(futures)
        return [held_before_stages] + [f.state.is_completed() for f in futures]

    from pipelines.retrain import train_and_evaluate

    assert stages(VARIANTS[:3]) == [1, True, True, True]
    assert len(rec.trains()) == 3
    assert len(asked) == 1 and asked[0] < min(r["start"] for r in rec.runs)
    assert active() == 0

    asked.clear()
    assert stages([]) == [1]  # reserved, not taken: given back
    assert len(asked) == 1 and active() == 0

    # A run that fails before its reservation arrived (a bad dataset fails fast)
    # gives the slot back before it ends, not after its Prefect client closed
    # (the slot would then stay taken until its lease expired).
    given_back = threading.Event()

    @contextlib.contextmanager
    def slow(*args, **kwargs):
        time.sleep(1.0)
        with real(*args, **kwargs):
            yield
        given_back.set()

    monkeypatch.setattr(prefect.concurrency.sync, "concurrency", slow)

    @flow(name="fails-before-training")
    def fails() -> None:
        with slots.reserve(plan):
            raise ValueError("bad data")

    with pytest.raises(ValueError, match="bad data"):
        fails()
    assert given_back.is_set() and active() == 0


class _Parked:
    """Slots a reservation parked (what :class:`pipelines.held_slots.Held` does)."""

    released = False

    def release(self) -> None:
        self.released = True


@pytest.mark.parametrize("arrives_after", [0.0, 0.6])
def test_a_first_stage_whose_reserved_slot_is_held_elsewhere_says_so(monkeypatch, arrives_after):
    """The first training takes the slot reserved beside the data stages. If
    another run holds the limit (or, on a Prefect server, a killed run left it
    held for good), it used to wait without a word: it now says why after a
    moment, with the command that frees a leaked slot; a reservation that arrives
    in time says nothing."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipelines.held_slots import Handover, handover

    monkeypatch.setattr(Handover, "NOTICE_SECONDS", 0.3)
    monkeypatch.setattr(slots, "_taken", lambda plan: "rcnnops-stages 1 of 1")
    plan = slots.plan(1, "cpu", gpu_ids=())
    key = (plan.parallel, slots._limits(plan))
    said: list[str] = []

    class Log:
        def info(self, msg: str, *args) -> None:
            said.append(msg % args)

    done, parked = threading.Event(), _Parked()
    handover.coming(key, done)
    timer = threading.Timer(arrives_after, handover.arrived, (key, parked, done))
    timer.start()
    api = temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"})
    with api, slots.hold(plan, "train@rcnn", Log()):
        assert done.is_set()  # the stage ran on the reserved slot
    timer.join()
    assert parked.released  # given back after the stage (no stage waits for it)
    if arrives_after < Handover.NOTICE_SECONDS:
        assert said == []
    else:
        assert said == [
            "train@rcnn waits for a slot: rcnnops-stages 1 of 1 (held by other runs); if no "
            "other run is on, a killed run left them held: free them with `prefect gcl update "
            "rcnnops-stages --active-slots 0`"
        ]


def test_stages_waiting_for_slots_stop_when_their_run_ends(monkeypatch):
    """Ctrl-C on a run whose first stage waited for a slot another run held did
    not stop it: Prefect joins the task threads, and the wait never ended. Leaving
    the run's block now ends every wait for slots (the first stage's reservation,
    a later stage's turn) with RunEnded, in the tasks' threads."""
    import contextvars

    from pipelines.held_slots import Handover, RunEnded, handover, waits_end_with_the_run

    monkeypatch.setattr(Handover, "NOTICE_SECONDS", 60.0)
    plan = slots.plan(1, "cpu", gpu_ids=())
    key = (plan.parallel, slots._limits(plan))
    ended: dict[str, BaseException] = {}
    started = threading.Barrier(3)

    def stage(name: str) -> None:
        started.wait()
        try:
            with slots.hold(plan, name, logging.getLogger("test")):
                pass
        except BaseException as e:  # noqa: BLE001 - recorded for the assertion
            ended[name] = e

    never = threading.Event()
    with waits_end_with_the_run():
        handover.coming(key, never)  # reserved, never arrives
        threads = [
            threading.Thread(target=contextvars.copy_context().run, args=(stage, name))
            for name in ("train@rcnn", "train@fast_rcnn")
        ]
        for t in threads:
            t.start()
        started.wait()
        time.sleep(0.5)
        assert ended == {}  # both still waiting
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads)
    assert {type(e) for e in ended.values()} == {RunEnded} and len(ended) == 2
    handover.arrived(key, None, never)  # (what the reservation does when its wait ends)
    # one had the turn and waited for the reservation; the other waited for the turn
    # (and may have had it as the first gave it up, to meet the run's end there)
    reserved = "the run ended while waiting for the slots reserved for its first stage"
    turn = {f"the run ended while {n} waited for its turn" for n in ended}
    said = [str(e) for e in ended.values()]
    assert reserved in said and set(said) <= {reserved} | turn


@pytest.mark.parametrize("held_elsewhere", [False, True])
def test_an_unused_reservation_is_waited_for_only_while_it_may_still_arrive(
    monkeypatch, held_elsewhere
):
    """A run that ends before training gives its reservation back. Slots still
    being taken (a busy server: they come 0.2 s after asking) are waited for, then
    given back while the run's client is open. A reservation asked for longer than
    ``SETTLE_SECONDS`` ago waits for a limit another run holds: it is not waited
    for (Ctrl-C ended such a run only after waiting that long once more), and
    its slots, if they ever come, are given back as they come."""
    from pipelines import held_slots

    monkeypatch.setattr(held_slots.Reservation, "SETTLE_SECONDS", 0.5)
    freed, made = threading.Event(), []

    class Taken(_Parked):  # what Held does: returns once the limit gives a slot
        def __init__(self, limits) -> None:
            freed.wait(None if held_elsewhere else 0.2)
            made.append(self)

    monkeypatch.setattr(held_slots, "Held", Taken)
    key = ("test", held_elsewhere)
    reservation = held_slots.Reservation(key, (("rcnnops-stages", 1),), lambda: None)
    reservation.result()
    if held_elsewhere:
        time.sleep(0.6)  # past SETTLE_SECONDS since asking
    start = time.monotonic()
    reservation.give_back()
    took = time.monotonic() - start
    if held_elsewhere:
        assert took < 0.05 and made == []  # not waited for
        freed.set()  # the other run gives the limit back: the slot comes late
        reservation._thread.join(5)
    else:
        assert 0.1 < took < 0.5  # waited until it came
    assert len(made) == 1 and made[0].released  # and it was given back
    held_slots.handover.expect(key)
    assert held_slots.handover.take(key) is None  # nothing left parked for a stage


@pytest.mark.scale
def test_four_gpus_four_variants_one_distinct_gpu_each(harness, tmp_path, monkeypatch):
    """``parallel: auto`` with 4 GPUs: four stages at once, each on its own GPU,
    evaluation on the GPU its training had."""
    rec = Recorder(seconds=0.5, together=4)
    monkeypatch.setattr(dvcproj, "repro", rec)
    plan = slots.plan("auto", "auto", gpu_ids=FOUR)
    states = _run_stages(tmp_path, VARIANTS, plan)
    assert all(s.is_completed() for s in states)
    trains = rec.trains()
    assert sorted(r["stage"] for r in trains) == sorted(f"train@{v}" for v in VARIANTS)
    assert all(len(r["gpus"]) == 1 for r in trains)
    assert all(_overlap(a, b) for a in trains for b in trains)  # all four at once
    assert sorted(r["gpus"][0] for r in trains) == FOUR  # so: distinct, one each
    by_stage = {r["stage"]: r["gpus"] for r in rec.runs}
    for v in VARIANTS:
        assert by_stage[f"evaluate@{v}"] == by_stage[f"train@{v}"]


@pytest.mark.scale
def test_ddp_stages_get_disjoint_pairs(harness, tmp_path, monkeypatch):
    """``nproc: 2`` on 4 GPUs: two stages at a time, each with 2 GPUs, never shared."""
    rec = Recorder(seconds=0.5, together=2)
    monkeypatch.setattr(dvcproj, "repro", rec)
    plan = slots.plan("auto", "auto", nproc=2, gpu_ids=FOUR)
    assert (plan.parallel, plan.gpus_per_stage) == (2, 2)
    states = _run_stages(tmp_path, VARIANTS, plan)
    assert all(s.is_completed() for s in states)
    trains = rec.trains()
    assert len(trains) == 4 and all(len(r["gpus"]) == 2 for r in trains)
    for a in trains:
        for b in trains:
            if a is not b and _overlap(a, b):
                assert not set(a["gpus"]) & set(b["gpus"]), (a, b)
    assert any(_overlap(a, b) for a in trains for b in trains if a is not b)


@pytest.mark.scale
def test_a_killed_stage_frees_its_gpu_for_the_next(harness, tmp_path, monkeypatch):
    """2 GPUs, 3 variants: the first training to start is killed after 0.5 s; the
    third starts on that GPU while the second still holds the other."""
    rec = Recorder(seconds=6.0, kill_first=0.5)
    monkeypatch.setattr(dvcproj, "repro", rec)
    plan = slots.plan("auto", "auto", gpu_ids=["0", "1"])
    states = _run_stages(tmp_path, ["rcnn", "fast_rcnn", "faster_rcnn"], plan)
    assert sorted(s.is_completed() for s in states) == [False, True, True]
    killed, second, third = sorted(rec.trains(), key=lambda r: r["start"])
    assert [s["stage"] for s in rec.runs].count(f"evaluate@{killed['stage'][6:]}") == 0
    assert third["gpus"] == killed["gpus"] != second["gpus"]
    assert third["start"] < second["end"]  # it did not wait for the other GPU


# --- make gpu-check ----------------------------------------------------------------


def _gpu_check(args, tmp_path, timeout):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(sys.path),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),  # its own ephemeral API database
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "pipelines.gpu_check", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.skipif(torch_cuda(), reason="a GPU is visible: gpu-check would run")
def test_gpu_check_without_a_gpu_says_so_and_succeeds(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    proc = _gpu_check([], tmp_path, 120)
    assert proc.returncode == 0, proc.stderr
    assert "gpu-check: no GPU visible" in proc.stdout and "nothing to check" in proc.stdout


@pytest.mark.scale
def test_gpu_check_rehearsed_on_the_cpu(tmp_path):
    """The GPU check's steps (flow + tags, serving, the table) on the CPU, tiny."""
    proc = _gpu_check(["--rehearse-on-cpu", "--keep", str(tmp_path / "p")], tmp_path, 900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu-check: all checks passed" in proc.stdout
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| variant | device | precision | img/s train | ms/img inference")
    variants = [row.split("|")[1].strip() for row in table[1:]]
    assert variants == ["rcnn", "fast_rcnn", "faster_rcnn", "mask_rcnn", "faster_rcnn served"]
    import torch

    from rcnnops.precision import resolve_amp

    # amp: auto on this CPU: bf16 where it has AVX512-BF16 or AMX, else fp32
    expected = resolve_amp("auto", torch.device("cpu")).name
    for row in table[1:5]:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[1].startswith("cpu") and cells[2] == expected
        assert float(cells[3]) > 0 and float(cells[4]) > 0 and float(cells[5]) > 0
