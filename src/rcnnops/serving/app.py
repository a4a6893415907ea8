"""The HTTP app: MLflow's scoring protocol, bounded, answering with the version the
:class:`~rcnnops.serving.follower.Follower` holds.

Routes: ``POST /invocations`` (JSON with one of ``dataframe_split``,
``dataframe_records``, ``instances`` or ``inputs``, and optional ``params``, as
``mlflow models serve`` takes it), ``GET /ping`` (200 once a model is loaded),
``GET /health`` (JSON: version serving, alias followed, failed loads),
``GET /version`` (the MLflow version, as MLflow's server answers).

Every answer names the model version that computed it: the ``X-Model-Version``
header, and ``model_version`` beside ``predictions`` in the body. Errors are one
JSON line ``{"error_code": ..., "message": ...}``, never a stack trace:
400 a bad request, 413 over a size limit, 415 not JSON, 503 the queue is full or
the wait for a compute slot passed the time limit, 504 the time limit passed
while computing (the remaining images are not computed).

Admission is bounded: at most ``workers`` requests compute at once and
``max_queue`` more wait (their bodies read and held); one more gets 503 at once,
before its body is read. So memory is bounded by
``(workers + max_queue) x max_request_mb`` of bodies plus ``workers`` images
being computed (each no larger than the model works at, see
:mod:`rcnnops.detect`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from rcnnops.detect import DeadlineExceeded, InputError, TooLarge
from rcnnops.serving.follower import Follower, one_line

log = logging.getLogger("rcnnops.serve")

INPUT_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")


@dataclass(frozen=True)
class RequestLimits:
    """Per-server bounds (params ``serve``; flags of ``rcnnops serve``)."""

    max_request_mb: float = 32.0
    workers: int = 1
    max_queue: int = 4
    timeout_s: float = 60.0

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1024 * 1024)


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def parse_payload(payload: Any) -> tuple[Any, dict]:
    """A scoring request's JSON -> ``(model input as columns or a list, params)``."""
    if not isinstance(payload, dict):
        raise InputError(f"expected a JSON object with one of {', '.join(INPUT_KEYS)}")
    keys = [k for k in INPUT_KEYS if k in payload]
    unknown = sorted(set(payload) - set(INPUT_KEYS) - {"params"})
    if len(keys) != 1 or unknown:
        raise InputError(
            f"expected exactly one of {', '.join(INPUT_KEYS)} (and optionally 'params'); "
            f"got {', '.join(sorted(payload)) or 'nothing'}"
        )
    params = payload.get("params") or {}
    if not isinstance(params, dict):
        raise InputError("'params' must be a JSON object, e.g. {\"score_threshold\": 0.5}")
    key, value = keys[0], payload[keys[0]]
    if key == "dataframe_split":
        if not isinstance(value, dict) or not isinstance(value.get("data"), list):
            raise InputError("dataframe_split needs 'columns' and 'data' (a list of rows)")
        columns = value.get("columns") or ["image"]
        rows = value["data"]
        if any(not isinstance(r, list) or len(r) != len(columns) for r in rows):
            raise InputError(f"dataframe_split: every row needs {len(columns)} value(s)")
        return {c: [r[i] for r in rows] for i, c in enumerate(columns)}, params
    if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
        names = sorted({k for r in value for k in r})
        return {c: [r.get(c) for r in value] for c in names}, params
    if isinstance(value, dict | list):
        return value, params
    raise InputError(f"{key} must be a list of rows or an object of columns")


class Admission:
    """``workers`` compute slots and ``max_queue`` waiting places (one event loop)."""

    def __init__(self, limits: RequestLimits) -> None:
        self.limits = limits
        self.inside = 0
        self.slots = asyncio.Semaphore(limits.workers)

    def enter(self) -> None:
        if self.inside >= self.limits.workers + self.limits.max_queue:
            raise HttpError(
                503, "SERVER_BUSY",
                f"server busy: {self.inside} requests computing or queued (limit: workers "
                f"{self.limits.workers} + max_queue {self.limits.max_queue}); retry later",
            )  # fmt: skip
        self.inside += 1

    def leave(self) -> None:
        self.inside -= 1


async def drain(request: Any, cap: int) -> None:
    """Read and drop up to ``cap`` bytes of a body that will not be used, so the
    client, still sending, can read the refusal instead of a connection reset."""
    seen = 0
    with contextlib.suppress(Exception):
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > cap:
                return


async def read_body(request: Any, limits: RequestLimits) -> bytes:
    """The body, refused with 413 as soon as it is known to pass ``max_request_mb``
    (from Content-Length, or while reading); the rest is read and dropped, up to
    four times the limit (held in memory: never more than the limit)."""
    limit, declared = limits.max_request_bytes, request.headers.get("content-length")
    too_big = HttpError(
        413, "REQUEST_TOO_LARGE",
        f"request body is larger than {limits.max_request_mb:g} MB (max_request_mb)",
    )  # fmt: skip
    if declared is not None and declared.isdigit() and int(declared) > limit:
        await drain(request, 4 * limit)
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            chunks.clear()
            await drain(request, 3 * limit)
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(follower: Follower, limits: RequestLimits) -> Any:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    from rcnnops.pyfunc import threshold_from

    executor = ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="detect")
    admission = Admission(limits)

    def error(status: int, code: str, message: str, version: str | None = None) -> Response:
        headers = {"X-Model-Version": version} if version else None
        body = {"error_code": code, "message": message}
        return JSONResponse(body, status_code=status, headers=headers)

    async def invocations(request: Any) -> Response:
        started = time.monotonic()
        deadline = started + limits.timeout_s
        try:
            admission.enter()
        except HttpError as e:
            await drain(request, limits.max_request_bytes)
            return error(e.status, e.code, e.message)
        version = None
        try:
            media = request.headers.get("content-type", "").split(";")[0].strip()
            if media.lower() != "application/json":  # media types ignore case (RFC 9110)
                await drain(request, limits.max_request_bytes)
                raise HttpError(
                    415,
                    "UNSUPPORTED_MEDIA_TYPE",
                    f"Content-Type must be application/json, got {media or 'none'}",
                )
            body = await read_body(request, limits)
            try:
                payload = json.loads(body)
            except json.JSONDecodeError as e:
                raise InputError(f"the body is not JSON ({e.msg} at char {e.pos})") from None
            except UnicodeDecodeError as e:
                raise InputError(f"the body is not JSON (not UTF-8 at byte {e.start})") from None
            except RecursionError:
                raise InputError("the body's JSON is nested too deeply") from None
            model_input, params = parse_payload(payload)
            threshold = threshold_from(params)
            try:
                await asyncio.wait_for(admission.slots.acquire(), deadline - time.monotonic())
            except TimeoutError:
                raise HttpError(503, "QUEUE_TIMEOUT",
                                f"waited {limits.timeout_s:g} s for a compute slot (timeout_s); "
                                "retry later") from None  # fmt: skip
            try:
                loaded = follower.current  # this request finishes on it, whatever swaps
                version = loaded.version
                loop = asyncio.get_running_loop()
                predictions = await loop.run_in_executor(
                    executor, loaded.detect, model_input, threshold, deadline
                )
            finally:
                admission.slots.release()
            body = {"predictions": predictions, "model": loaded.name, "model_version": version}
            return JSONResponse(body, headers={"X-Model-Version": version})
        except HttpError as e:
            return error(e.status, e.code, e.message, version)
        except TooLarge as e:
            return error(413, "REQUEST_TOO_LARGE", str(e), version)
        except InputError as e:
            return error(400, "INVALID_PARAMETER_VALUE", str(e), version)
        except DeadlineExceeded as e:
            return error(504, "DEADLINE_EXCEEDED", f"{e} (timeout_s {limits.timeout_s:g})", version)
        except Exception as e:  # the model failed: one line to the client, the trace to the log
            log.exception("request failed on v%s", version)
            return error(500, "INTERNAL_ERROR", f"the model failed: {one_line(e)}", version)
        finally:
            admission.leave()

    async def ping(request: Any) -> Response:
        return PlainTextResponse("\n")

    async def health(request: Any) -> Response:
        return JSONResponse(follower.health())

    async def version(request: Any) -> Response:
        import mlflow

        return PlainTextResponse(mlflow.__version__)

    routes = [
        Route("/invocations", invocations, methods=["POST"]),
        Route("/ping", ping, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        yield
        follower.stop()
        executor.shutdown(wait=False, cancel_futures=True)

    return Starlette(routes=routes, lifespan=lifespan)
