"""DVC commands forked from a process that has DVC loaded.

``python -m dvc`` spends about half a second importing DVC before it looks at
the project, and a retraining run starts it once per group of stages (six times
for the four variants) and for its push. While a run lasts, a launcher process
imports DVC once; each command is then a fork of it that calls DVC's own entry
point (``dvc.cli.main``, as ``python -m dvc`` does, and as DVC's daemon does after
its own fork) in the caller's folder, with the caller's environment and its
output on the caller's pipe. So the commands, their output, the files they write
and their exit codes are those of ``python -m dvc``; only the import is not paid
again, and DVC's YAML files are read and written faster (see
:func:`rcnnops.dvc_yaml.quicker`).

Linux only (``fork``, file descriptors passed over a Unix socket). Elsewhere, or
when the launcher is not running or has died, :func:`spawn` returns None and the
caller starts ``python -m dvc`` as a process; ``RCNNOPS_DVC_LAUNCHER=0`` asks for
that too. The launcher exits when the process that started it closes its end of
the socket (or dies).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, NoReturn

from rcnnops import dvc_yaml

# What ``dvc repro`` and ``dvc push`` import beyond ``dvc.cli`` (the modules their
# first run in a process added to ``sys.modules``, DVC 3.67); a module missing from
# another DVC version is skipped.
_PRELOAD = (
    "dvc.cli",
    "dvc.cli.parser",
    "dvc.commands.repro",
    "dvc.commands.data_sync",
    "dvc.repo",
    "dvc.repo.index",
    "dvc.repo.reproduce",
    "dvc.repo.push",
    "dvc.stage",
    "dvc.stage.run",
    "dvc.output",
    "dvc.dependency",
    "dvc.lock",
    "dvc.rwlock",
    "dvc.cachemgr",
    "dvc.data_cloud",
    "dvc.scm",
    "dvc._debug",
    "dvc_data.hashfile",
    "dvc_data.index",
    "dvc_render",
    "scmrepo.git",
    "scmrepo.noscm",
    # and what each fork still imported (a quick run's, DVC 3.67): 0.07 s apiece
    "dvc.repo.stage",
    "dvc.repo.params",
    "dvc.repo.metrics",
    "dvc.repo.plots",
    "dvc.repo.artifacts",
    "dvc.repo.datasets",
    "dvc.repo.open_repo",
    "dvc.dirs",
    "dvc_data.hashfile.db.local",
    "dvc_data.hashfile.status",
    "fsspec.implementations.memory",
    "configobj",
    "platformdirs",
    "pyparsing",
    "ruamel.yaml",
    "yaml",
)
_INT = struct.Struct("!i")
_KILLED = -1  # the fork ended without reporting its exit code (killed by a signal)


def supported() -> bool:
    """Whether DVC commands can be forked here (and are not switched off)."""
    wanted = os.environ.get("RCNNOPS_DVC_LAUNCHER", "1") != "0"
    return wanted and sys.platform.startswith("linux") and hasattr(socket, "send_fds")


class Forked:
    """A DVC command forked by the launcher: ``stdout`` (its output and error
    streams, a pipe) and :meth:`wait`, as far as :func:`rcnnops.project.dvc`
    uses a ``subprocess.Popen``."""

    def __init__(self, pid: int, stdout: BinaryIO, reply: socket.socket) -> None:
        self.pid, self.stdout, self._reply = pid, stdout, reply

    def wait(self) -> int:
        """The command's exit code (after its output's end); -1 if it was killed."""
        try:
            code = _read_int(self._reply)
        finally:
            self._reply.close()
            self.stdout.close()
        return _KILLED if code is None else code


class Launcher:
    """The launcher process and the socket to it; :meth:`spawn` forks a command."""

    def __init__(self, env: dict[str, str]) -> None:
        self._control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._lock = threading.Lock()
        with theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "rcnnops.dvc_launcher", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                env=env,
                # as a `dvc` process's output is (a pipe): no colours, no tty
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

    def spawn(self, argv: Sequence[str], cwd: Path, env: dict[str, str]) -> Forked | None:
        """Fork ``dvc ARGV`` in ``cwd`` with ``env``; None if the launcher is gone
        (nothing was run then). Waits until the fork has started: a request sent
        while the launcher still imports DVC waits for it."""
        if self.process.poll() is not None:
            return None
        request = json.dumps({"argv": list(argv), "cwd": str(cwd), "env": env}).encode()
        read_fd, write_fd = os.pipe()
        mine, theirs = socket.socketpair()
        try:
            with self._lock:
                socket.send_fds(self._control, [request], [write_fd, theirs.fileno()])
        except OSError:
            os.close(read_fd)
            mine.close()
            return None
        finally:
            os.close(write_fd)  # the fork holds the write ends now
            theirs.close()
        pid = _read_int(mine)
        if pid is None:  # the launcher died before forking
            os.close(read_fd)
            mine.close()
            return None
        return Forked(pid, os.fdopen(read_fd, "rb"), mine)

    def close(self) -> None:
        self._control.close()  # the launcher's next read sees the end and exits
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_active: Launcher | None = None


@contextlib.contextmanager
def running(env: dict[str, str]) -> Iterator[Launcher | None]:
    """A launcher for the enclosed block (None where forking is not supported or
    one is already running); :func:`spawn` uses it."""
    global _active
    if not supported() or _active is not None:
        yield None
        return
    _active = Launcher(env)
    try:
        yield _active
    finally:
        launcher, _active = _active, None
        launcher.close()


def spawn(argv: Sequence[str], cwd: Path, env: dict[str, str]) -> Forked | None:
    """``dvc ARGV`` forked by the running launcher; None if there is none."""
    launcher = _active
    return None if launcher is None else launcher.spawn(argv, cwd, env)


def _read_int(sock: socket.socket) -> int | None:
    data = b""
    while len(data) < _INT.size:
        chunk = sock.recv(_INT.size - len(data))
        if not chunk:
            return None
        data += chunk
    return _INT.unpack(data)[0]


# --- the launcher process --------------------------------------------------------


def _parser_built_once() -> None:
    """DVC's command-line parser (all its commands: 0.04 s) built here, once, for
    every fork: each fork parses its one command line with its own copy."""
    try:
        from dvc.cli import parser

        built = parser.get_main_parser()
    except Exception:  # noqa: BLE001 - only an optimisation: each fork builds its own
        return
    parser.get_main_parser = lambda: built


def _serve(control: socket.socket) -> None:
    import importlib

    for name in _PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    dvc_yaml.quicker()
    _parser_built_once()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the forks
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(control, 1 << 20, 2)
        except OSError:
            return
        if not msg:  # the caller closed its end (or died): the run is over
            return
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            control.close()
            _run(json.loads(msg), *fds)
        for fd in fds:
            os.close(fd)


def _run(request: dict, out_fd: int, reply_fd: int) -> NoReturn:
    """In the fork: become ``python -m dvc ARGV`` in the request's folder and
    environment, report the pid, then the exit code, and exit with it."""
    code = 255
    reply = socket.socket(fileno=reply_fd)
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # DVC waits for its stage commands
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.close(out_fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        reply.sendall(_INT.pack(os.getpid()))
        from dvc.cli import main

        sys.argv = ["dvc", *request["argv"]]
        code = main(request["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()  # what the interpreter's exit would run
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        with contextlib.suppress(OSError):
            reply.sendall(_INT.pack(code))
        os._exit(code & 0xFF)


if __name__ == "__main__":
    _serve(socket.socket(fileno=int(sys.argv[1])))
