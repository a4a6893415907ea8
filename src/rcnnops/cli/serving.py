"""Using registered models: serve over HTTP, predict on image files."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from rcnnops.cli.common import add, params


def serve_settings(args: argparse.Namespace) -> Any:
    """params ``serve`` with the command's flags over it, checked as params are."""
    from pydantic import ValidationError

    from rcnnops.config import ParamsError

    settings = params(args).serve
    flags = {k: getattr(args, k, None) for k in type(settings).model_fields}
    flags = {k: v for k, v in flags.items() if v is not None}
    try:  # validated as params.yaml's values are (model_copy would not check them)
        return type(settings).model_validate(settings.model_dump() | flags)
    except ValidationError as e:
        problems = "; ".join(
            f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}" for err in e.errors()
        )
        raise ParamsError(problems) from None


def model_config(s: Any) -> dict:
    return {"device": s.device, "max_images": s.max_images,
            "max_image_pixels": s.max_image_pixels, "max_image_side": s.max_image_side}  # fmt: skip


def cmd_serve(args: argparse.Namespace) -> int:
    from rcnnops import registry, tracking
    from rcnnops.device import resolve_device
    from rcnnops.serving.app import RequestLimits
    from rcnnops.serving.follower import Follower
    from rcnnops.serving.server import serve

    s = serve_settings(args)
    resolve_device(s.device)  # a GPU asked for on a machine without one: say so now
    tracking.check_reachable(then="start serving once it is back")  # at once, not in minutes
    tracking.setup(params(args).register.experiment)
    name = registry.model_name(args.variant)
    if args.version is not None:
        registry.get_version(name, str(args.version))  # a clear error for a missing one
        follower = Follower(name, None, str(args.version), s.poll_s, model_config(s))
    else:
        registry.resolve(args.variant, args.alias, params(args).register.experiment)
        follower = Follower(name, args.alias, None, s.poll_s, model_config(s))
    limits = RequestLimits(s.max_request_mb, s.workers, s.max_queue, s.timeout_s)
    return serve(follower, limits, args.host, args.port)


def cmd_predict(args: argparse.Namespace) -> int:
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from rcnnops import registry
    from rcnnops.detect import InputError
    from rcnnops.device import resolve_device
    from rcnnops.serving import files

    s = serve_settings(args)
    resolve_device(s.device)
    images = files.read_images(args.images)
    if args.draw:  # before any work: a --draw that is a file fails now, not after it
        if Path(args.draw).exists() and not Path(args.draw).is_dir():
            raise InputError(f"--draw {args.draw}: not a folder")
        Path(args.draw).mkdir(parents=True, exist_ok=True)
    experiment = params(args).register.experiment
    model = registry.load_pyfunc(args.variant, args.alias, experiment, model_config(s))
    dets = []
    for start in range(0, len(images), s.max_images):  # max_images limits a request
        chunk = images[start : start + s.max_images]
        frame = pd.DataFrame({"image": [b64 for _, b64 in chunk]})
        try:
            dets += model.predict(frame, params={"score_threshold": args.score_threshold})
        except MlflowException as e:  # a file that is not an image: say which
            row = re.search(r"input row (\d+)", e.message)
            named = e.message.replace(row[0], str(chunk[int(row[1])][0]), 1) if row else e.message
            raise InputError(named) from None
    if args.json:
        out = [{"image": str(p), **d} for (p, _), d in zip(images, dets, strict=True)]
        print(json.dumps(out, indent=2))
    else:
        for (path, _), det in zip(images, dets, strict=True):
            print(files.format_detections(path, det))
    if args.draw:
        names = files.drawing_names([path for path, _ in images])
        for (path, _), det, name in zip(images, dets, names, strict=True):
            written = files.draw(path, det, Path(args.draw) / name)
            print(f"drew {written}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from rcnnops.serving import export

    out = Path(args.out) if args.out else None
    written, rows, where = export.export_version(
        Path.cwd(), params(args), args.variant, args.format, args.version, out
    )
    print(export.parity_table(rows))
    print(
        f"parity holds on {len(rows)} validation images; wrote {written} (README.md, "
        f"parity.json); logged as {where}"
    )
    return 0


def _fraction(text: str) -> float:
    """A number in [0, 1] (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


DEVICE_HELP = "where the model runs: auto (CUDA when present, else CPU), cpu, cuda or cuda:N"


SERVE_EPILOG = """\
example:
  rcnnops serve faster_rcnn --port 5001 &
  python - <<'PY'
  import base64, json, urllib.request
  img = base64.b64encode(open("image.png", "rb").read()).decode()
  body = {"dataframe_records": [{"image": img}], "params": {"score_threshold": 0.5}}
  req = urllib.request.Request("http://127.0.0.1:5001/invocations", json.dumps(body).encode(),
                               {"Content-Type": "application/json"})
  print(urllib.request.urlopen(req).read().decode())
  PY
The answer is {"predictions": [{"boxes": [[x1, y1, x2, y2], ...], "labels": [...],
"names": [...], "scores": [...]} per image], "model_version": "N"} (plus "masks"
as COCO RLE for mask variants) and the header X-Model-Version: N. Errors are one
JSON line {"error_code", "message"}: 400 bad request, 413 over a limit, 503 busy,
504 past timeout_s. GET /health shows the version serving, the alias followed
and any version that failed to load (the previous one keeps serving).

The server polls the registry (MLflow has no push): when the alias moves, the new
version is loaded and checked in the background, then swapped in; requests in
flight finish on the old one.
"""


def add_parsers(sub: Any) -> None:
    sp = add(
        sub,
        "serve",
        cmd_serve,
        "serve a registered model over HTTP, following its alias (promotions, rollbacks)",
    )
    sp.formatter_class = argparse.RawDescriptionHelpFormatter
    sp.epilog = SERVE_EPILOG
    sp.add_argument("variant", help="e.g. faster_rcnn (model rcnnops-VARIANT)")
    which = sp.add_mutually_exclusive_group()
    which.add_argument(
        "--alias", default="champion", help="alias to serve and follow (default: champion)"
    )
    which.add_argument(
        "--version", type=int, metavar="N", help="serve version N and never switch (no polling)"
    )
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    sp.add_argument("--port", type=int, default=5001, help="TCP port (default: 5001)")
    sp.add_argument(
        "--poll-s",
        type=float,
        dest="poll_s",
        metavar="S",
        help="look the alias up every S seconds (params serve.poll_s, 10)",
    )
    _limit_flags(sp)
    sp.add_argument(
        "--max-request-mb",
        type=float,
        metavar="MB",
        help="largest request body (params serve.max_request_mb, 32)",
    )
    sp.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="requests computing at once (params serve.workers, 1)",
    )
    sp.add_argument(
        "--max-queue",
        type=int,
        metavar="N",
        help="requests waiting for a worker before 503 (serve.max_queue, 4)",
    )
    sp.add_argument(
        "--timeout-s",
        type=float,
        metavar="S",
        help="time limit per request, wait + compute (serve.timeout_s, 60)",
    )
    sp = add(
        sub,
        "export",
        cmd_export,
        "export a registered version to TorchScript or ONNX, checked against the eager model",
        tracked=True,
    )
    sp.add_argument("variant", help="faster_rcnn or mask_rcnn (model rcnnops-VARIANT)")
    sp.add_argument(
        "--format",
        required=True,
        choices=["torchscript", "onnx"],
        help="torchscript (torch.jit.script) or onnx (opset 17, ONNX Runtime)",
    )
    sp.add_argument("--version", type=int, metavar="N", help="version N (default: the champion)")
    sp.add_argument(
        "--out",
        metavar="DIR",
        help="where to write (default: exports/VARIANT-vN-FORMAT; must not exist)",
    )
    sp = add(sub, "predict", cmd_predict, "run a registered model on image files; print or draw",
             tracked=True)  # fmt: skip
    sp.add_argument("variant", help="e.g. faster_rcnn (model rcnnops-VARIANT)")
    sp.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    sp.add_argument("--alias", default="champion", help="alias to load (default: champion)")
    sp.add_argument(
        "--score-threshold",
        type=_fraction,
        default=0.5,
        help="keep detections scoring at least this (default: 0.5)",
    )
    sp.add_argument("--draw", metavar="OUTDIR", help="also write OUTDIR/<image>.png with drawings")
    sp.add_argument("--json", action="store_true", help="JSON instead of text")
    _limit_flags(sp)


def _limit_flags(sp: Any) -> None:
    sp.add_argument(
        "--max-images",
        type=int,
        metavar="N",
        help="images per request (params serve.max_images, 16)",
    )
    sp.add_argument(
        "--max-image-pixels",
        type=int,
        metavar="N",
        help="decoded pixels per image (params serve.max_image_pixels, 50000000)",
    )
    sp.add_argument(
        "--max-image-side",
        type=int,
        metavar="PX",
        help="pixels on an image's longer side (params serve.max_image_side, 16384)",
    )
    sp.add_argument("--device", help=DEVICE_HELP + " (params serve.device, auto)")
