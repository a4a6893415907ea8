"""Serving a registered model over HTTP, and predicting on image files.

``rcnnops serve`` runs ``mlflow models serve -m models:/rcnnops-<variant>@<alias>
--env-manager local`` (the current environment, no network) bound to
127.0.0.1 unless told otherwise; the server answers ``POST /invocations``
with ``{"predictions": [...]}`` (see :mod:`rcnnops.pyfunc`) and bad requests
with HTTP 400 and a message. ``rcnnops predict`` loads the same model
in-process and prints or draws its detections.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from rcnnops.errors import UserError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5001


class ServeError(UserError, RuntimeError):
    """The server cannot be started (port in use, bad address) or did not come up."""


def check_port_free(host: str, port: int) -> None:
    """Raise :class:`ServeError` if ``host:port`` cannot be bound right now."""
    if not 0 < port < 65536:
        raise ServeError(f"port {port} is not a TCP port (1..65535)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ServeError(f"cannot resolve host {host!r}: {e}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind(address)
        except OSError as e:
            raise ServeError(
                f"port {port} on {host} is in use or not allowed ({e.strerror}); "
                "choose another with --port"
            ) from None


def free_port(host: str = DEFAULT_HOST) -> int:
    """A port the OS reports free on ``host`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def server_command(model_uri: str, host: str, port: int, workers: int = 1) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


def server_env(
    tracking_uri: str, max_image_side: int | None = None, device: str | None = None
) -> dict[str, str]:
    """The child's environment: this interpreter's bin first on PATH (mlflow starts
    ``uvicorn`` by name), the project's tracking store, the model config overrides
    (image-size limit, device)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    config = {"max_image_side": max_image_side, "device": device}
    config = {k: v for k, v in config.items() if v is not None}
    if config:
        env["MLFLOW_PYFUNC_INFERENCE_CONFIG"] = json.dumps(config)
    return env


def start_server(
    model_uri: str,
    tracking_uri: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    max_image_side: int | None = None,
    device: str | None = None,
    **popen: object,
) -> subprocess.Popen:
    """Start the scoring server in its own process group (stop it with :func:`stop_server`)."""
    check_port_free(host, port)
    return subprocess.Popen(
        server_command(model_uri, host, port),
        env=server_env(tracking_uri, max_image_side, device),
        start_new_session=True,
        **popen,
    )


def _signal_group(pid: int, sig: int) -> bool:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop_server(proc: subprocess.Popen, timeout: float = 15.0) -> int | None:
    """SIGTERM the server's process group (uvicorn and its workers), then SIGKILL
    whatever is left of the group; returns the server's exit code."""
    if proc.poll() is None and _signal_group(proc.pid, signal.SIGTERM):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    _signal_group(proc.pid, signal.SIGKILL)  # stragglers, or a server deaf to SIGTERM
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    """Poll ``url``/ping until it answers 200; :class:`ServeError` if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServeError(f"the model server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise ServeError(f"the model server did not answer {url}/ping within {timeout:.0f} s")


def serve(
    model_uri: str,
    tracking_uri: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    max_image_side: int | None = None,
    device: str | None = None,
) -> int:
    """Run the server in the foreground until it exits or Ctrl-C; returns its exit code."""
    if not is_loopback(host):
        print(
            f"warning: serving on {host}, reachable from other machines; the MLflow "
            "scoring server has no authentication",
            file=sys.stderr,
        )
    proc = start_server(model_uri, tracking_uri, host, port, max_image_side, device)
    print(f"serving {model_uri} on http://{host}:{port}/invocations (Ctrl-C stops)", flush=True)
    # The server has a process group of its own: stop it on Ctrl-C and on
    # SIGTERM / SIGHUP too (a service manager, a closed terminal), never orphan it.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return proc.wait()
    finally:
        stop_server(proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


# --- predicting on files -----------------------------------------------------------


def read_images(paths: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """``(path, base64 of the file)`` for each image; a clear error for a missing
    file or a folder."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            raise FileNotFoundError(f"{p}: is a folder; name the image files (e.g. {p}/*.jpg)")
        if not p.is_file():
            raise FileNotFoundError(f"{p}: image file not found")
        out.append((p, base64.b64encode(p.read_bytes()).decode()))
    return out


def format_detections(path: Path, det: dict) -> str:
    """One image's detections as readable lines (name, score, xyxy box)."""
    lines = [f"{path}: {len(det['boxes'])} detection(s)"]
    has_masks = bool(det.get("masks"))
    for box, name, score in zip(det["boxes"], det["names"], det["scores"], strict=True):
        coords = ", ".join(f"{v:.1f}" for v in box)
        lines.append(f"  {name:<16} {score:.3f}  [{coords}]" + ("  +mask" if has_masks else ""))
    return "\n".join(lines)


def as_records(det: dict) -> list[dict]:
    """Detections (xyxy, label ids) as COCO result records (xywh) for drawing."""
    records = []
    masks = det.get("masks") or [None] * len(det["boxes"])
    for box, label, score, mask in zip(
        det["boxes"], det["labels"], det["scores"], masks, strict=True
    ):
        x1, y1, x2, y2 = box
        r = {"bbox": [x1, y1, x2 - x1, y2 - y1], "category_id": label, "score": score}
        if mask is not None:
            r["segmentation"] = mask
        records.append(r)
    return records


def draw(image_path: Path, det: dict, out_dir: Path) -> Path:
    """``out_dir/<stem>.png``: the image with its detections (boxes, labels, masks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rcnnops.data.io import load_image_array
    from rcnnops.plots import draw_detections

    image = load_image_array(image_path)
    h, w = image.shape[:2]
    fig = plt.figure(figsize=(max(w, 64) / 50, max(h, 64) / 50), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    names = dict(zip(det["labels"], det["names"], strict=True))
    draw_detections(ax, image, as_records(det), names)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{image_path.stem}.png"
    fig.savefig(out)
    plt.close(fig)
    return out
