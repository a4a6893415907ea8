"""What every comparison shares: the bench project, timing, result records.

A comparison module has ``run(ctx: Context) -> dict`` returning a *section*::

    {"title": str, "paper": str,            # what the papers report
     "columns": [str, ...], "rows": [{column: value}, ...],
     "targets": [{"name", "value", "unit", "target", "holds"}, ...],   # optional
     "notes": [str, ...]}                                               # optional

A target's ``name`` says what it compares, its ``value`` is a number and its
``unit`` says what of ("x" for a ratio, "%", "s", "AP", "" for a plain number):
:func:`write_section` refuses anything else.

and is run by ``python -m benchmarks`` in a process of its own.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("rcnn", "fast_rcnn", "faster_rcnn", "mask_rcnn")


@dataclass(frozen=True)
class Context:
    """``work``: scratch folder; ``project``: the bench project made by
    ``benchmarks.setup`` (default data, trained variants, reports)."""

    work: Path
    quick: bool
    pipeline_runs: int = 0  # the pipeline row's repetitions (0: its default for the mode)

    @property
    def project(self) -> Path:
        return self.work / "project"

    def pick(self, quick: Any, full: Any) -> Any:
        return quick if self.quick else full


# -- timing -------------------------------------------------------------------------


def now() -> float:
    """Wall clock for timings; waits for queued CUDA work first."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = now()
    out = fn()
    return now() - t0, out


def ab(
    cases: dict[str, Callable[[Any], Any]], inputs: Iterable[Any], warmup: int = 1
) -> dict[str, list[float]]:
    """Time every case on every input, interleaved A/B/A/B on the same input so
    that drifts of the machine (clock, other load) hit all cases alike.
    Returns seconds per case per input; the first ``warmup`` inputs are run but
    not kept (allocator and kernel warm-up)."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for i, x in enumerate(inputs):
        for name, fn in cases.items():
            t, _ = timed(lambda fn=fn, x=x: fn(x))
            if i >= warmup:
                times[name].append(t)
    return times


def median_ms(seconds: list[float]) -> float:
    return 1000.0 * statistics.median(seconds)


class Split:
    """Accumulates time spent inside chosen methods (``wrap``), by bucket."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, obj: Any, method: str, bucket: str) -> None:
        inner = getattr(obj, method)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = now()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[bucket] = self.seconds.get(bucket, 0.0) + now() - t0

        setattr(obj, method, wrapper)

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


def write_section(name: str, title: str, run: Callable[[], dict], out: Path) -> None:
    """Run one comparison (``run()``, in the child process) and write its section to
    ``out``: its result, or its traceback under ``error``, with its seconds and name."""
    import traceback

    t0 = time.perf_counter()
    try:
        section = run()
        check_targets(section)
    except Exception:
        section = {"title": title, "error": traceback.format_exc()}
    section["seconds"] = time.perf_counter() - t0
    section["name"] = name
    out.write_text(json.dumps(section, indent=2, default=str))


def check_targets(section: dict) -> None:
    """Raise ``ValueError`` naming the target whose value is not a number or which
    has no unit (results.json keeps numbers; the tables format them)."""
    for t in section.get("targets", []):
        value = t.get("value")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"target {t.get('name')!r}: value {value!r} is not a number")
        if not isinstance(t.get("unit"), str):
            raise ValueError(f'target {t.get("name")!r}: no unit (use "" for a plain number)')


def shown(target: dict) -> str:
    """A target's value for the tables: three significant digits or so, then its
    unit ("53.1x", "7.43 %", "2.2e-16"). Sections kept from results written before
    targets had units show their value as it was stored."""
    value, unit = target["value"], target.get("unit")
    if unit is None and isinstance(value, float):  # kept from before units: as shown then
        return f"{value:.2f}x" if value > 1 else f"{value:.3f}"
    if unit is None or isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    size = abs(value)
    if 0 < size < 1e-3:
        number = f"{value:.1e}"
    elif size >= 100:
        number = f"{value:.0f}"
    elif size >= 10:
        number = f"{value:.1f}"
    else:
        number = f"{value:.3g}"
    return number + ("x" if unit == "x" else f" {unit}" if unit else "")


# -- the bench project ----------------------------------------------------------------


def new_project(path: Path, assignments: dict[str, Any]) -> Path:
    """A project folder like the repo (dvc.yaml, params.yaml, stage sources) with
    ``assignments`` applied to params.yaml (dotted keys, as ``rcnnops run --set``)."""
    from rcnnops.params_edit import set_params

    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, path / name)
    shutil.copytree(
        REPO / "src", path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    if assignments:
        set_params(path / "params.yaml", assignments)
    return path


def project_env(project: Path) -> dict[str, str]:
    """Environment for commands in ``project``: its own MLflow store, and the
    running interpreter's bin folder first on PATH (``rcnnops``, ``dvc``)."""
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("RCNNOPS_DVC_REMOTE", None)
    return env


def command(project: Path, *args: str, env_extra: dict | None = None, watch=None) -> float:
    """Run ``rcnnops ARGS`` in ``project``; seconds taken. Its output goes to
    ``<project>/bench.log``; a failure raises with the log's tail. ``watch(proc)``,
    if given, runs in a thread while the command does (e.g. to sample memory)."""
    log = project / "bench.log"
    with log.open("a") as out:
        out.write(f"\n$ rcnnops {' '.join(args)}\n")
        out.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "rcnnops"), *args],
            cwd=project,
            env=project_env(project) | (env_extra or {}),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        watcher = threading.Thread(target=watch, args=(proc,), daemon=True) if watch else None
        if watcher:
            watcher.start()
        code = proc.wait()
        took = time.perf_counter() - t0
        if watcher:
            watcher.join()
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"`rcnnops {' '.join(args)}` failed in {project}:\n{tail}")
    return took


STAGE_COMMAND = re.compile(r"\brcnnops (generate|prepare|proposals|train|evaluate)\b")


class CpuWatch:
    """CPU seconds (user + system) of a process tree, split between the stage
    commands (``rcnnops generate|prepare|proposals|train|evaluate`` and everything
    they start) and the rest (the flow's process, Prefect's server, DVC's
    processes), and the stage commands' lifetimes: each one's process start (exact)
    to its end (between the last sample that saw it and the next).

    The rest's CPU in each sampling interval counts as beside the stage commands in
    proportion to how much of the interval a stage command was alive (see
    :func:`attribute`): what DVC does just before it starts a command counts only
    for its share of that interval, not for all of it (that time is outside the
    stage commands, counted as such). Sampled every ``interval`` s, so a
    process's last fraction of an interval before it ends is not counted
    (short-lived ones such as ``git`` are missed); the sampler's own CPU (about
    2 ms a sample, outside the tree) competes with the run too."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        import psutil

        self._psutil, self._root, self.interval = psutil, psutil.Process(pid), interval
        self._t0 = time.perf_counter()
        # A process's create_time() minus this: its start on the watch's clock.
        self._clock = psutil.boot_time() + _since_boot(psutil)
        self._roles: dict[int, str] = {}
        self._cpu: dict[int, float] = {}
        self._lives: dict[int, list[float]] = {}  # stage pid: [start, last seen alive]
        self._times: list[float] = [0.0]  # sample times, from the watch's start
        self._deltas: list[dict[str, float]] = []  # the rest's CPU by role, per interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _role(self, proc) -> str:
        """``stage``, or which of the rest: ``flow`` (the command's own process),
        ``prefect server``, ``dvc`` (the launcher and its forks, or DVC processes),
        ``other``."""
        if self._roles.get(proc.pid) in (None, "dvc", "other"):  # not final: see below
            try:
                cmdline = " ".join(proc.cmdline())
                parent = proc.ppid()
            except self._psutil.Error:
                return self._roles.get(proc.pid, "gone")
            if STAGE_COMMAND.search(cmdline) or self._roles.get(parent) == "stage":
                role = "stage"
            elif proc.pid == self._root.pid:
                role = "flow"
            elif "prefect.server" in cmdline:
                role = "prefect server"
            elif "dvc" in cmdline:
                role = "dvc"  # a fork of DVC's launcher may yet exec a stage command
            else:
                role = "other"
            self._roles[proc.pid] = role
        return self._roles[proc.pid]

    def _sample(self) -> None:
        try:
            procs = [self._root, *self._root.children(recursive=True)]
        except self._psutil.Error:
            return
        now, deltas = time.perf_counter() - self._t0, {}
        for proc in sorted(procs, key=_started):  # a parent before its children
            role = self._role(proc)
            try:
                times = proc.cpu_times()
                if role == "stage" and proc.pid not in self._lives:  # its start, to 10 ms
                    self._lives[proc.pid] = [proc.create_time() - self._clock, now]
            except self._psutil.Error:
                continue
            cpu = times.user + times.system
            if role == "stage":
                self._lives[proc.pid][1] = now
            else:
                deltas[role] = deltas.get(role, 0.0) + cpu - self._cpu.get(proc.pid, 0.0)
            self._cpu[proc.pid] = cpu
        self._times.append(now)
        self._deltas.append(deltas)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        self._sample()
        windows = lifetimes(list(self._lives.values()), self._times)
        during, outside = attribute(self._times, self._deltas, windows)
        stage = sum(c for pid, c in self._cpu.items() if self._roles.get(pid) == "stage")
        return {
            "stage_commands": stage,
            "stage_seconds": sum(b - a for a, b in windows),
            "rest_while_stages_ran": sum(during.values()),
            "rest_otherwise": outside,
            "while_stages_by_process": dict(sorted(during.items())),
        }


def lifetimes(lives: list[list[float]], times: list[float]) -> list[tuple[float, float]]:
    """Processes' lifetimes, merged where they overlap, from ``[start, last seen
    alive]`` pairs and the sample times: each ends halfway between the sample
    that last saw it and the next one (which did not)."""
    spans = []
    for start, seen in lives:
        i = bisect.bisect_right(times, seen)  # the first sample after ``seen``
        spans.append((max(start, 0.0), (seen + times[i]) / 2 if i < len(times) else seen))
    merged: list[list[float]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def attribute(
    times: list[float], deltas: list[dict[str, float]], windows: list[tuple[float, float]]
) -> tuple[dict[str, float], float]:
    """Split each interval's CPU (``deltas[i]``, by role, used between ``times[i]``
    and ``times[i + 1]``) between the ``windows`` (disjoint) and the rest of the
    time, in proportion to how much of the interval they cover: (CPU inside them,
    by role; CPU outside them)."""
    during: dict[str, float] = {}
    outside = 0.0
    for (a, b), interval in zip(itertools.pairwise(times), deltas, strict=True):
        covered = sum(max(0.0, min(b, hi) - max(a, lo)) for lo, hi in windows)
        share = covered / (b - a) if b > a else 0.0
        for role, cpu in interval.items():
            during[role] = during.get(role, 0.0) + share * cpu
            outside += (1 - share) * cpu
    return during, outside


def _since_boot(psutil) -> float:
    """Seconds since boot, now: the clock of a process's start on Linux
    (``create_time()`` is the boot time, to the second, plus the start's ticks)."""
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except OSError:  # not Linux: process starts are wall-clock times
        return time.time() - psutil.boot_time()


def _started(proc) -> float:
    try:
        return proc.create_time()
    except Exception:  # noqa: BLE001 - gone since it was listed: last
        return float("inf")


def timed_run(
    project: Path, *args: str, log: Path | None = None, cpu: dict | None = None
) -> tuple[float, list[tuple[float, str]]]:
    """Run ``rcnnops ARGS`` in ``project`` like :func:`command`, its output read line
    by line: ``(seconds, [(t, line), ...])``, ``t`` from the start. ``log``: where the
    timestamped lines are written (as ``[t] line``). ``cpu``: a dict filled with
    :class:`CpuWatch`'s figures for the run's processes."""
    env = project_env(project) | {"PYTHONUNBUFFERED": "1"}
    cmd = [str(Path(sys.executable).parent / "rcnnops"), *args]
    start, lines = time.perf_counter(), []
    with subprocess.Popen(
        cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        watch = CpuWatch(proc.pid) if cpu is not None else None
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))
        proc.wait()
        if watch is not None:
            cpu.update(watch.stop())
    took = time.perf_counter() - start
    if log is not None:
        log.write_text("\n".join(f"[{t:8.2f}] {s}" for t, s in lines))
    if proc.returncode:
        tail = "\n".join(line for _, line in lines[-30:])
        raise RuntimeError(f"`rcnnops {' '.join(args)}` failed in {project}:\n{tail}")
    return took, lines


def load_params(project: Path):
    from rcnnops.config import load_params as load

    return load(project / "params.yaml")


def load_trained(project: Path, variant: str):
    """``(model in eval mode, model.json)`` of a variant trained in ``project``."""
    from rcnnops.models.io import load_model

    model, meta = load_model(project / "models" / variant)
    return model.eval(), meta


def val_dataset(project: Path, proposals: bool = False, train: bool = False):
    """``(DetectionDataset, coco dict, LabelMap)`` of the project's prepared split;
    with the cached selective-search boxes when ``proposals``."""
    from rcnnops.data.dataset import DetectionDataset
    from rcnnops.data.prepare import load_split

    params = load_params(project)
    split = "train" if train else "val"
    coco, root, labels = load_split(project / params.prepare.out, split)
    boxes = None
    if proposals:
        from rcnnops.proposals.precompute import ProposalStore

        boxes = ProposalStore(project / params.proposals.out / split).boxes_for
    return DetectionDataset(coco, root, labels, proposals=boxes), coco, labels


def metrics(project: Path, variant: str) -> dict:
    return json.loads((project / "reports" / variant / "metrics.json").read_text())


def stage_times(project: Path) -> dict[str, float]:
    path = project / "stage_times.json"
    return json.loads(path.read_text()) if path.exists() else {}


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
