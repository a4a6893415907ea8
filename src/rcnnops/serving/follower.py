"""The model a server answers with, following a registry alias.

The MLflow registry has no push (no webhook or event stream reaches a process
that only reads it), so :class:`Follower` polls: every ``poll_s`` seconds it asks
which version ``rcnnops-<variant>@<alias>`` names. When that changes (a promotion
or a rollback), it downloads and loads the new version in the background, checks
it with one prediction on the version's own input example, and only then swaps it
in: one reference assignment, so a request that has picked the old version
finishes on it. A version that fails to load or to answer is not swapped in; the
old one keeps serving, the failure is logged and shown by :meth:`Follower.health`,
and the load is retried with a growing back-off while the alias still names it.
A pinned version (``version=``) is loaded once and never polled.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from rcnnops.errors import UserError
from rcnnops.redact import redact

log = logging.getLogger("rcnnops.serve")

MAX_BACKOFF_S = 600.0  # a failed version is retried at most this often apart


class CannotServe(UserError, RuntimeError):
    """The version asked for cannot be loaded or does not answer; says which and why."""


@dataclass(frozen=True)
class Loaded:
    """A loaded, checked model version; ``detect`` is its
    :meth:`rcnnops.pyfunc.DetectorPyfunc.detect`."""

    name: str
    version: str
    model: Any  # mlflow.pyfunc.PyFuncModel
    loaded_at: str

    @property
    def detect(self) -> Any:
        return self.model.unwrap_python_model().detect


@dataclass
class Failure:
    version: str
    error: str
    at: str
    attempts: int
    retry_at: float  # time.monotonic()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def one_line(e: BaseException) -> str:
    """An exception as one line without secrets (no traceback, no credentials)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return redact(f"{type(e).__name__}: {text}")[:500]


def load_version(name: str, version: str, model_config: dict) -> Loaded:
    """Download ``models:/name/version``, load it with ``mlflow.pyfunc`` and check it
    answers its own input example; any failure raises :class:`CannotServe` naming
    the version and where its artifacts are (MLflow's own error names the
    temporary copy)."""
    try:
        return _load_and_check(name, version, model_config)
    except Exception as e:
        raise CannotServe(
            f"{name} v{version} cannot be served: {one_line(e)} (its artifacts: "
            f"{_source(name, version)})"
        ) from e


def _load_and_check(name: str, version: str, model_config: dict) -> Loaded:
    import mlflow.artifacts
    from mlflow.models import Model

    from rcnnops import pyfunc

    with tempfile.TemporaryDirectory(prefix="rcnnops-serve-") as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version}", dst_path=tmp
        )
        model = pyfunc.load(local, model_config)
        example = Model.load(local).load_input_example(local)
    if example is None:
        raise ValueError("it has no input example to check it with")
    answers = model.unwrap_python_model().detect(example, 0.5)
    if not isinstance(answers, list) or len(answers) != len(example):
        raise ValueError(f"it answered its input example with {answers!r:.200}")
    return Loaded(name, str(version), model, _now())


def _source(name: str, version: str) -> str:
    """Where a version's artifacts are, as the registry says (for an error)."""
    from rcnnops import tracking

    try:
        return redact(str(tracking.client().get_model_version(name, version).source))
    except Exception:  # noqa: BLE001 - the error being reported matters more
        return "unknown: the registry did not say"


class Follower:
    """Serves ``name@alias`` (or the pinned ``version``); see the module docstring.

    ``resolve(name, alias) -> version`` and ``load(name, version) -> Loaded`` are
    the registry lookup and :func:`load_version` (parameters for tests)."""

    def __init__(
        self,
        name: str,
        alias: str | None = "champion",
        version: str | None = None,
        poll_s: float = 10.0,
        model_config: dict | None = None,
        resolve: Any = None,
        load: Any = None,
    ) -> None:
        self.name, self.alias, self.pinned, self.poll_s = name, alias, version, poll_s
        self.model_config = model_config or {}
        self._resolve = resolve or _resolve_alias
        self._load = load or (lambda n, v: load_version(n, v, self.model_config))
        self._current: Loaded | None = None
        self.failure: Failure | None = None
        self.registry_error: str | None = None
        self.last_poll: str | None = None
        self.swaps = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> Loaded:
        """The version answering now (read once per request)."""
        assert self._current is not None, "Follower.start() first"
        return self._current

    def start(self) -> Loaded:
        """Load the first version (any failure raises: nothing to serve) and, unless
        pinned, start polling in a daemon thread."""
        version = self.pinned or self._resolve(self.name, self.alias)
        self._current = self._load(self.name, version)
        if self.pinned is None:
            self._thread = threading.Thread(target=self._run, name="alias-follower", daemon=True)
            self._thread.start()
        return self._current

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll_once()

    def poll_once(self) -> bool:
        """One look at the alias; returns True when a new version was swapped in."""
        try:
            wanted = str(self._resolve(self.name, self.alias))
        except Exception as e:  # the registry is down: keep serving what we have
            message = one_line(e)
            if message != self.registry_error:
                log.warning("cannot read %s@%s: %s", self.name, self.alias, message)
            self.registry_error = message
            return False
        self.registry_error, self.last_poll = None, _now()
        if wanted == self.current.version:
            self.failure = None  # e.g. rolled back past a broken version
            return False
        failure = self.failure
        if failure and failure.version == wanted and time.monotonic() < failure.retry_at:
            return False
        old = self.current.version
        log.info("%s@%s moved to v%s: loading it (v%s keeps serving)", self.name,
                 self.alias, wanted, old)  # fmt: skip
        try:
            loaded = self._load(self.name, wanted)
        except Exception as e:
            attempts = failure.attempts + 1 if failure and failure.version == wanted else 1
            backoff = min(self.poll_s * 2**attempts, MAX_BACKOFF_S)
            self.failure = Failure(wanted, one_line(e), _now(), attempts,
                                   time.monotonic() + backoff)  # fmt: skip
            log.error("v%s failed to load or to answer; still serving v%s (retry in %.0f s): %s",
                      wanted, old, backoff, self.failure.error)  # fmt: skip
            return False
        self._current, self.failure = loaded, None  # the swap: one reference assignment
        self.swaps += 1
        log.info("now serving %s v%s (was v%s)", self.name, wanted, old)
        return True

    def health(self) -> dict:
        """What ``/health`` shows: the version serving, what it follows, failures."""
        current = self.current
        out: dict[str, Any] = {
            "status": "ok",
            "model": self.name,
            "version": current.version,
            "loaded_at": current.loaded_at,
            "follows": None if self.pinned else f"{self.name}@{self.alias}",
            "poll_s": None if self.pinned else self.poll_s,
            "last_poll": self.last_poll,
            "swaps": self.swaps,
        }
        if self.failure is not None:
            out["status"] = "degraded"
            out["failed_load"] = {
                "version": self.failure.version, "error": self.failure.error,
                "at": self.failure.at, "attempts": self.failure.attempts,
            }  # fmt: skip
        if self.registry_error is not None:
            out["status"] = "degraded"
            out["registry_error"] = self.registry_error
        return out


def _resolve_alias(name: str, alias: str) -> str:
    """The version ``name@alias`` names. A tracking server that is down is found
    by a 5 s probe first: MLflow's client retries it for minutes, during which
    ``/health`` said ``ok``."""
    from rcnnops import tracking

    tracking.check_reachable(then="still serving the version loaded before")
    return str(tracking.client().get_model_version_by_alias(name, alias).version)
