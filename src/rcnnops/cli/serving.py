"""Using registered models: serve over HTTP, predict on image files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rcnnops.cli.common import add, params


def cmd_serve(args: argparse.Namespace) -> int:
    from rcnnops import registry, serve, tracking
    from rcnnops.device import resolve_device

    resolve_device(args.device)  # a GPU asked for on a machine without one: say so now
    experiment = params(args).register.experiment
    mv = registry.resolve(args.variant, args.alias, experiment)
    print(f"{registry.model_name(args.variant)}@{args.alias} is version {mv.version}")
    return serve.serve(
        registry.model_uri(args.variant, args.alias),
        tracking.tracking_uri(),
        args.host,
        args.port,
        args.max_image_side,
        args.device,
    )


def cmd_predict(args: argparse.Namespace) -> int:
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from rcnnops import registry, serve
    from rcnnops.detect import InputError
    from rcnnops.device import resolve_device

    resolve_device(args.device)
    images = serve.read_images(args.images)
    config = {"device": args.device}
    if args.max_image_side:
        config["max_image_side"] = args.max_image_side
    experiment = params(args).register.experiment
    model = registry.load_pyfunc(args.variant, args.alias, experiment, config)
    frame = pd.DataFrame({"image": [b64 for _, b64 in images]})
    try:
        dets = model.predict(frame, params={"score_threshold": args.score_threshold})
    except MlflowException as e:  # a file that is not an image: the model says which row
        rows = "; ".join(f"row {i} is {p}" for i, (p, _) in enumerate(images))
        raise InputError(f"{e.message} ({rows})") from None
    if args.json:
        out = [{"image": str(p), **d} for (p, _), d in zip(images, dets, strict=True)]
        print(json.dumps(out, indent=2))
    else:
        for (path, _), det in zip(images, dets, strict=True):
            print(serve.format_detections(path, det))
    if args.draw:
        for (path, _), det in zip(images, dets, strict=True):
            written = serve.draw(path, det, Path(args.draw))
            print(f"drew {written}", file=sys.stderr if args.json else sys.stdout)
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
"names": [...], "scores": [...]} per image] (plus "masks" as COCO RLE for mask
variants); a request that is not a batch of images gets HTTP 400 with a message.
"""


def add_parsers(sub: Any) -> None:
    sp = add(
        sub,
        "serve",
        cmd_serve,
        "serve a registered model over HTTP (mlflow models serve, local environment)",
    )
    sp.formatter_class = argparse.RawDescriptionHelpFormatter
    sp.epilog = SERVE_EPILOG
    sp.add_argument("variant", help="e.g. faster_rcnn (model rcnnops-VARIANT)")
    sp.add_argument("--alias", default="champion", help="alias to serve (default: champion)")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    sp.add_argument("--port", type=int, default=5001, help="TCP port (default: 5001)")
    sp.add_argument(
        "--max-image-side",
        type=int,
        metavar="PX",
        help="refuse images longer than PX pixels on a side with HTTP 400 (default: 4096)",
    )
    sp.add_argument("--device", default="auto", help=DEVICE_HELP + " (default: auto)")
    sp = add(sub, "predict", cmd_predict, "run a registered model on image files; print or draw")
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
    sp.add_argument("--max-image-side", type=int, metavar="PX", help="image size limit")
    sp.add_argument("--device", default="auto", help=DEVICE_HELP + " (default: auto)")
