"""``rcnnops serve``: the app of :mod:`.app` on uvicorn, in this process.

Why not ``mlflow models serve``: it loads one model version when it starts and
never again, so following an alias would mean restarting it (failing requests
meanwhile), and it has no hook for request limits or a version header. This
server keeps MLflow's scoring protocol and loads every version through
``mlflow.pyfunc`` (the same registered artifact ``mlflow models serve`` would
load), on Starlette + uvicorn, the ASGI stack MLflow's own scoring server runs
on, so nothing new is installed. One process: the model is held once in memory
and swapped in place; ``workers`` threads compute (torch releases the GIL).
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from rcnnops.serving.app import RequestLimits, create_app
from rcnnops.serving.follower import Follower
from rcnnops.serving.process import DEFAULT_HOST, DEFAULT_PORT, check_port_free, is_loopback

log = logging.getLogger("rcnnops.serve")


def serve(
    follower: Follower,
    limits: RequestLimits,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
) -> int:
    """Load the first version (a failure raises before anything listens), then
    serve until SIGINT / SIGTERM / SIGHUP; returns 0 on a clean stop."""
    import uvicorn

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )
    check_port_free(host, port)
    # MLflow draws a progress bar for each download of a version (at start and at
    # every swap): lines of noise in a server's log. A user's own setting stands.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not is_loopback(host):
        log.warning("serving on %s, reachable from other machines, with no authentication: "
                    "put an authenticating proxy in front", host)  # fmt: skip
    first = follower.start()
    app = create_app(follower, limits)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    follows = (
        f"pinned to v{follower.pinned}"
        if follower.pinned
        else f"following {follower.name}@{follower.alias} every {follower.poll_s:g} s"
    )
    print(
        f"serving {first.name} v{first.version} ({follows}) on "
        f"http://{host}:{port}/invocations (Ctrl-C stops)",
        flush=True,
    )
    previous = signal.signal(signal.SIGHUP, lambda *_: setattr(server, "should_exit", True))
    try:
        server.run()  # uvicorn handles SIGINT and SIGTERM: in-flight requests finish
    finally:
        signal.signal(signal.SIGHUP, previous)
        follower.stop()
    return 0
