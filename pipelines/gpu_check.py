"""``make gpu-check``: everything rcnnops does on GPUs, in one command, in minutes.

On a machine with GPUs it builds a throw-away project (generated shapes at 512 px;
Faster / Mask R-CNN at torchvision's reference architecture, ResNet-50-FPN at
800/1333 without downloaded weights; R-CNN and Fast R-CNN at the defaults) and:

1. runs the retraining flow with ``pipeline.parallel: auto`` and ``amp: auto``:
   a short mixed-precision training and evaluation of every variant, each on
   the GPU(s) it leased (checked from the runs' MLflow tags: device, precision,
   ``CUDA_VISIBLE_DEVICES``; trainings that overlapped in time must not share one);
2. with 2 or more GPUs, trains Faster R-CNN again with DDP on every visible GPU
   (``train.nproc`` = the GPU count) and checks the world size it recorded;
3. serves the Faster R-CNN champion with ``rcnnops serve --device cuda`` and
   times requests;

then prints one table (variant, device, img/s train, ms/img inference, peak
memory) and exits 1 if any check failed. Without a visible GPU it says so and
exits 0. ``--rehearse-on-cpu`` runs the same steps on the CPU at a tiny scale
(what the scale test suite does, so this script never rots unrun).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines import gpus

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("rcnn", "fast_rcnn", "faster_rcnn", "mask_rcnn")


def gpu_settings() -> dict[str, Any]:
    """The check's params on GPUs: every variant, one short epoch, autocast."""
    from rcnnops.presets import FASTERRCNN_RESNET50_FPN, MASKRCNN_RESNET50_FPN

    short = {"epochs": 1, "lr": 0.01, "warmup_iters": 10, "lr_steps": [], "amp": "auto"}
    changes: dict[str, Any] = {
        "generate.num_train": 64,
        "generate.num_val": 16,
        "generate.image_size": 512,
        "generate.min_object_size": 48,
        "generate.max_object_size": 160,
        "variants": list(VARIANTS),
        "train.device": "auto",
        "pipeline.parallel": "auto",
        "train.faster_rcnn.model": FASTERRCNN_RESNET50_FPN | {"pretrained": None},
        "train.mask_rcnn.model": MASKRCNN_RESNET50_FPN | {"pretrained": None},
        "train.faster_rcnn.batch_size": 4,
        "train.mask_rcnn.batch_size": 4,
    }
    for v in VARIANTS:
        changes |= {f"train.{v}.{k}": value for k, value in short.items()}
    return changes


def cpu_rehearsal_settings() -> dict[str, Any]:
    """The same steps on a CPU, as small as they go (the default small models)."""
    changes: dict[str, Any] = {
        "generate.num_train": 8,
        "generate.num_val": 4,
        "generate.image_size": 64,
        "generate.min_object_size": 12,
        "generate.max_object_size": 30,
        "variants": list(VARIANTS),
        "train.device": "cpu",
        "pipeline.parallel": "auto",
        "proposals.workers": 1,
    }
    for v in VARIANTS:
        changes |= {f"train.{v}.epochs": 1, f"train.{v}.amp": "auto"}
    return changes


@dataclass
class Report:
    """Rows of the table and the checks that failed."""

    rows: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> bool:
        print(f"  [{'ok' if ok else 'FAILED'}] {what}", flush=True)
        if not ok:
            self.failures.append(what)
        return ok


def make_project(folder: Path, changes: dict[str, Any]) -> Path:
    """A project like the repository's (its dvc.yaml, params.yaml and the stage
    sources dvc.yaml lists as dependencies) with ``changes``."""
    from rcnnops.params_edit import set_params

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, folder / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(REPO / "src", folder / "src", ignore=ignore, dirs_exist_ok=True)
    set_params(folder / "params.yaml", changes)
    return folder


def variant_runs(project: Path, experiment: str) -> dict[str, Any]:
    """The newest training run of each variant in the project's tracking store."""
    from rcnnops import tracking

    tracking.setup(experiment, project)
    client = tracking.client()
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs(
        [exp.experiment_id], "tags.variant != ''", order_by=["attributes.start_time DESC"]
    )
    newest: dict[str, Any] = {}
    for r in runs:
        if "device" in r.data.tags:
            newest.setdefault(r.data.tags["variant"], r)
    return newest


def _overlap(a: Any, b: Any) -> bool:
    return max(a.info.start_time, b.info.start_time) < min(a.info.end_time, b.info.end_time)


def check_flow(project: Path, report: Report, device_type: str, visible: list[str]) -> None:
    """Run the flow; check each variant's device, precision and GPU lease from its tags."""
    from pipelines.retrain import retrain
    from rcnnops.config import load_params

    print("1. the retraining flow, parallel: auto, amp: auto", flush=True)
    decisions = retrain(project=str(project), push_to_remote=False)
    report.check(len(decisions) == len(VARIANTS), f"{len(decisions)} variants registered")
    experiment = load_params(project / "params.yaml").register.experiment
    runs = variant_runs(project, experiment)
    expected_precision = "fp16" if device_type == "cuda" else None
    for v in VARIANTS:
        run = runs.get(v)
        if not report.check(run is not None, f"{v}: trained and tracked"):
            continue
        tags, metrics = run.data.tags, run.data.metrics
        report.check(tags["device"].startswith(device_type), f"{v}: on {tags['device']}")
        if expected_precision:
            report.check(tags["precision"] == expected_precision, f"{v}: {tags['precision']}")
        leased = tags.get("cuda_visible_devices")
        if device_type == "cuda":
            ok = leased is not None and len(leased.split(",")) == 1 and leased in visible
            report.check(ok, f"{v}: leased GPU {leased}")
        report.rows.append(_row(v, tags, metrics))
    if device_type == "cuda":
        trained = [r for r in runs.values() if r.info.end_time]
        for a in trained:
            for b in trained:
                if a is not b and _overlap(a, b) and a.info.run_id < b.info.run_id:
                    ga, gb = (
                        a.data.tags["cuda_visible_devices"],
                        b.data.tags["cuda_visible_devices"],
                    )
                    va, vb = a.data.tags["variant"], b.data.tags["variant"]
                    report.check(ga != gb, f"{va} and {vb} overlapped on GPUs {ga} / {gb}")


def _row(name: str, tags: dict, metrics: dict) -> dict:
    memory = metrics.get("peak_gpu_memory_mb")
    return {
        "variant": name,
        "device": f"{tags['device']} ({tags.get('device_name', '?')})",
        "precision": tags.get("precision", "?"),
        "img/s train": metrics.get("train_epoch/images_per_s"),
        "ms/img inference": metrics.get("infer_ms_per_image"),
        "peak memory MiB": memory if memory is not None else metrics.get("peak_rss_mb"),
        "memory of": "GPU" if memory is not None else "process RSS",
    }


def check_ddp(project: Path, report: Report, visible: list[str]) -> None:
    """Faster R-CNN with one process per visible GPU (torchrun), via the stage command."""
    from rcnnops.params_edit import set_params

    n = len(visible)
    print(f"2. DDP: faster_rcnn on {n} GPUs", flush=True)
    set_params(project / "params.yaml", {"train.nproc": n})
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "train", "--variant", "faster_rcnn"],
        cwd=project,
        env=env,
    )
    if not report.check(proc.returncode == 0, f"DDP training exited {proc.returncode}"):
        return
    meta = json.loads((project / "models/faster_rcnn/model.json").read_text())
    report.check(meta["world_size"] == n, f"DDP world size {meta['world_size']} (expected {n})")
    from rcnnops import tracking

    run = tracking.client().get_run(meta["run_id"])
    report.rows.append(_row(f"faster_rcnn DDP x{n}", run.data.tags, run.data.metrics))


def check_serving(project: Path, report: Report, device: str, requests: int = 10) -> None:
    """``rcnnops serve``'s server with ``--device``: answers, and how fast."""
    from rcnnops.serving import process as serve

    print(f"3. serving faster_rcnn@champion on {device}", flush=True)
    port = serve.free_port()
    image = sorted((project / "data/raw/shapes/val").glob("*.png"))[0]
    body = json.dumps(
        {"dataframe_records": [{"image": base64.b64encode(image.read_bytes()).decode()}]}
    ).encode()
    log = open(project / "serve.log", "wb")  # noqa: SIM115 (closed below)
    proc = serve.start_server(
        project, "faster_rcnn", port, "--device", device, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        url = f"http://127.0.0.1:{port}"
        serve.wait_until_up(url, proc)
        times = []
        for _ in range(requests + 1):  # the first one warms up
            req = urllib.request.Request(
                f"{url}/invocations", body, {"Content-Type": "application/json"}
            )
            t0 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=120) as r:
                answer = json.loads(r.read())
            times.append((time.perf_counter() - t0) * 1000)
        report.check("predictions" in answer, f"served on {device}: HTTP answers")
        ms = sorted(times[1:])[len(times[1:]) // 2]
        report.rows.append(
            {"variant": "faster_rcnn served", "device": device, "ms/img inference": ms}
        )
    except Exception as e:  # the check reports it and goes on to the table
        report.check(False, f"serving on {device}: {e}")
    finally:
        serve.stop_server(proc)
        log.close()


def render(rows: list[dict]) -> str:
    from rcnnops.tables import markdown_table

    columns = ("variant", "device", "precision", "img/s train", "ms/img inference",
               "peak memory MiB", "memory of")  # fmt: skip

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    return markdown_table(columns, [[cell(r.get(c)) for c in columns] for r in rows])


def main(argv: list[str] | None = None) -> int:
    from pipelines import patient_ephemeral_api

    patient_ephemeral_api()
    parser = argparse.ArgumentParser(
        prog="make gpu-check",
        description=__doc__.split("\n\n")[0] + " See pipelines/gpu_check.py.",
    )
    parser.add_argument(
        "--rehearse-on-cpu",
        action="store_true",
        help="run the same steps on the CPU at a tiny scale (no GPU needed)",
    )
    parser.add_argument("--keep", metavar="DIR", help="build the project in DIR and keep it")
    args = parser.parse_args(argv)
    visible = gpus.visible_gpu_ids()
    if not args.rehearse_on_cpu:
        import torch

        if not visible or not torch.cuda.is_available():
            print(
                "gpu-check: no GPU visible (nvidia-smi lists none, or CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}, or this torch has no "
                "CUDA); nothing to check"
            )
            return 0
    device_type = "cpu" if args.rehearse_on_cpu else "cuda"
    settings = cpu_rehearsal_settings() if args.rehearse_on_cpu else gpu_settings()
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="rcnnops-gpu-check-"))
    t0 = time.monotonic()
    report = Report()
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the project's own store, not a team server
    project = make_project(folder.resolve(), settings)
    cwd = os.getcwd()  # the flow works inside the project
    try:
        check_flow(project, report, device_type, visible)
        if device_type == "cuda" and len(visible) >= 2:
            check_ddp(project, report, visible)
        check_serving(project, report, device_type)
    except Exception as e:
        report.check(False, f"{type(e).__name__}: {e}")
    finally:
        os.chdir(cwd)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print()
    print(render(report.rows))
    minutes = (time.monotonic() - t0) / 60
    if report.failures:
        print(f"\ngpu-check: {len(report.failures)} check(s) FAILED in {minutes:.1f} min:")
        for f in report.failures:
            print(f"  - {f}")
        return 1
    print(f"\ngpu-check: all checks passed in {minutes:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
