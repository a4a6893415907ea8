"""The server as a process: ports, starting ``rcnnops serve`` in a child process
(tests, ``make gpu-check``), waiting for it, stopping it and its process group."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

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


def start_server(
    project: Path, variant: str, port: int, *args: str, **popen: Any
) -> subprocess.Popen:
    """``rcnnops serve VARIANT --port PORT ARGS`` in ``project``, in a process group
    of its own (stop it with :func:`stop_server`)."""
    check_port_free(DEFAULT_HOST, port)
    cmd = [sys.executable, "-m", "rcnnops.cli", "serve", variant, "--port", str(port), *args]
    return subprocess.Popen(cmd, cwd=project, start_new_session=True, **popen)


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
