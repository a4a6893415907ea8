"""The MLflow pyfunc model every registered version is: images in, detections out.

Logged as MLflow "models from code" (``pyfunc_model.py``, no pickled Python
object) with the weights bundle (``model.pt`` read with
``torch.load(weights_only=True)``, ``model.json``, ``serving.json``) as an
artifact, a signature, an input example and a ``model_config``.

Input (a DataFrame, or JSON ``dataframe_records`` / ``dataframe_split`` /
``inputs`` when served): one row per image with either ``image`` (a
base64-encoded image file) or ``array`` (``uint8 [H, W, 3]`` pixels).
Param ``score_threshold`` (default 0.5). Output: one dict per image, see
:mod:`rcnnops.detect`. Bad requests raise ``MlflowException``
``INVALID_PARAMETER_VALUE``, which the scoring server answers with HTTP 400.

``model_config`` limits (see :class:`rcnnops.detect.ImageLimits`): ``max_images``
per request, ``max_image_pixels`` and ``max_image_side`` per image; override them
with ``mlflow.pyfunc.load_model(uri, model_config={"max_image_pixels": N})`` or,
for ``mlflow models serve``, ``MLFLOW_PYFUNC_INFERENCE_CONFIG``
(``rcnnops serve`` passes the ``serve`` params). ``model_config`` ``serve_device``
(default ``auto``: CUDA when present, else CPU; or ``cpu``, ``cuda:N``) is where
the model runs, chosen when it loads (``rcnnops serve/predict --device``; ``device``
in :func:`load`'s config). MLflow also logs the config as params of the run the
model is logged in, the run that trained it, whose ``device`` is the training's.
"""

from __future__ import annotations

import base64
import io
import logging
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException

from rcnnops.data.pixels import allow_pixels
from rcnnops.detect import Detector, ImageLimits, InputError, images_from_input

ENTRY = Path(__file__).with_name("pyfunc_model.py")
DEFAULT_THRESHOLD = 0.5
LOGGED_CONFIG = {  # the defaults, written into each version's MLmodel for readers
    "serve_device": "auto",  # MLflow passes only the keys a version logged to load_context
    "max_images": ImageLimits().max_images,
    "max_image_pixels": ImageLimits().max_pixels,
    "max_image_side": ImageLimits().max_side,
}
# The device :func:`load` was asked for, read by ``load_context`` in the same call.
_LOAD_DEVICE: ContextVar[str | None] = ContextVar("rcnnops_load_device", default=None)


def load(uri: str, model_config: dict | None = None) -> Any:
    """``mlflow.pyfunc.load_model(uri, model_config)`` with the config's ``device``
    (or ``serve_device``) honoured for every version. MLflow drops the config keys a
    version did not log (with a warning), and versions registered before the device
    was logged did not: their ``--device`` was ignored (the model ran on ``auto``).
    So the device is handed to ``load_context`` beside MLflow's config."""
    config = dict(model_config or {})
    device = config.pop("device", None)
    device = config.pop("serve_device", None) or device
    token = _LOAD_DEVICE.set(device)
    try:
        return mlflow.pyfunc.load_model(uri, model_config=config or None)
    finally:
        _LOAD_DEVICE.reset(token)


class DetectorPyfunc(mlflow.pyfunc.PythonModel):
    """See the module docstring."""

    def load_context(self, context: Any) -> None:
        config = context.model_config or {}
        # "device": what versions logged before (it clashed with the training run's
        # param of that name, so MLflow logged none of the config as params)
        logged = config.get("serve_device", config.get("device", "auto"))
        device = _LOAD_DEVICE.get() or str(logged)
        self.detector = Detector.from_dir(Path(context.artifacts["model_dir"]), device)
        self.limits = ImageLimits.from_config(config)
        allow_pixels(self.limits.max_pixels)  # Pillow's guard no lower than the limit

    # ``model_input`` is hinted as a DataFrame, the one hint MLflow neither reads as a
    # schema (the logged signature is the schema) nor asks to be added: with no hint
    # at all it warned, in every process that loaded this class, to add one.
    def predict(self, context, model_input: pd.DataFrame, params=None):
        try:
            return self.detect(model_input, threshold_from(params))
        except InputError as e:
            raise MlflowException.invalid_parameter_value(str(e)) from None

    def detect(self, model_input: Any, threshold: float, deadline: float | None = None) -> list:
        """:meth:`predict` without MLflow's wrapping: :class:`InputError` (or
        :class:`~rcnnops.detect.TooLarge`) for a bad request, and a ``deadline``
        (``time.monotonic()``) checked between images. The server calls this."""
        images = images_from_input(model_input, self.limits, self.detector.fit)
        return self.detector(images, threshold, deadline)


def threshold_from(params: dict | None) -> float:
    raw = (params or {}).get("score_threshold", DEFAULT_THRESHOLD)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise InputError(f"score_threshold must be a number in [0, 1], got {raw!r}") from None
    if not 0.0 <= value <= 1.0:
        raise InputError(f"score_threshold must be in [0, 1], got {value}")
    return value


def signature():
    """Inputs ``image`` (string) and ``array`` (uint8 [H, W, 3] as nested ints), both
    optional per row; param ``score_threshold``."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    pixels = Array(Array(Array("long")))
    return ModelSignature(
        inputs=Schema(
            [ColSpec("string", "image", required=False), ColSpec(pixels, "array", required=False)]
        ),
        params=ParamSchema([ParamSpec("score_threshold", "double", DEFAULT_THRESHOLD)]),
    )


def example_png(size: int = 32) -> bytes:
    """A small generated PNG (a light square on grey) for the input example."""
    import numpy as np
    from PIL import Image

    pixels = np.full((size, size, 3), 96, np.uint8)
    pixels[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = (230, 200, 40)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def input_example():
    import pandas as pd

    return pd.DataFrame({"image": [base64.b64encode(example_png()).decode()]})


def requirements() -> list[str]:
    from importlib.metadata import version

    packages = ("torch", "torchvision", "mlflow", "pillow", "numpy", "pandas", "pycocotools")
    return [f"{p}=={version(p)}" for p in packages] + [
        f"opencv-contrib-python-headless=={version('opencv-contrib-python-headless')}"
    ]


class ServingCheckError(RuntimeError):
    """The logged model did not load, or did not predict its input example, as a
    server would (MLflow's check when it logs a model); the message is MLflow's error."""


# MLflow's check of a logged model (load it as served, predict the input example)
# only warns when it fails, with this text, from this logger.
_CHECK_LOGGER = "mlflow.models.model"
_CHECK_FAILED = "Failed to validate serving input example"


class _ServingCheck(logging.Filter):
    """Takes MLflow's warning that the check failed, so :func:`log` raises instead."""

    def __init__(self) -> None:
        super().__init__()
        self.error: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(_CHECK_FAILED):
            return True
        self.error = message.rsplit("Got error: ", 1)[-1].strip()
        return False


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """MLflow draws a progress bar for each copy of the model's three files (its check
    loads the model from a copy): lines of noise in a run's log."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def arguments(bundle: Path) -> dict:
    """What :func:`mlflow.pyfunc.save_model` and ``log_model`` are given for ``bundle``."""
    return {
        "python_model": str(ENTRY),
        "artifacts": {"model_dir": str(bundle)},
        "model_config": LOGGED_CONFIG,
        "pip_requirements": requirements(),
        "signature": signature(),
        "input_example": input_example(),
    }


@contextmanager
def _skipped(name: str, modules: tuple[Any, ...]) -> Iterator[None]:
    """MLflow's function ``name`` a no-op, where ``modules`` call it, for the block.
    Where MLflow no longer has it, nothing is skipped (the work is only done again)."""
    callers = [m for m in modules if hasattr(m, name)]
    originals = [getattr(m, name) for m in callers]
    for m in callers:
        setattr(m, name, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        for m, original in zip(callers, originals, strict=True):
            setattr(m, name, original)


def no_requirement_scan():
    """Without MLflow's comparison of the model's pinned requirements with the
    installed packages when it saves or loads the model. It only warns, and it maps
    every installed distribution's files to do it (1-2.5 s of CPU, once per
    process); :func:`requirements` pins exactly the installed versions, so it cannot
    find a mismatch here."""
    import mlflow.utils.environment

    modules = (mlflow.utils.environment, mlflow.pyfunc)
    return _skipped("warn_dependency_requirement_mismatches", modules)


def log(bundle: Path, checked: bool = False) -> Any:
    """Log the model (in the active run) from a bundle folder; returns MLflow's
    ModelInfo. ``checked``: the bundle passed :func:`rcnnops.serving_check.check` (the
    evaluate stage's), so MLflow's own check of the logged model is not run again:
    this process then never loads the model (nor torch). Otherwise raises :class:`ServingCheckError`
    when the logged model does not load or predict its input example as served
    (MLflow only warns); that logged model is deleted first."""
    import mlflow.models.utils

    check = _ServingCheck()
    logger = logging.getLogger(_CHECK_LOGGER)
    logger.addFilter(check)
    try:
        with ExitStack() as skips:
            skips.enter_context(no_progress_bars())
            skips.enter_context(no_requirement_scan())
            if checked:  # (mlflow.pyfunc.log_model has no switch for its check)
                skips.enter_context(_skipped("_validate_serving_input", (mlflow.models.utils,)))
            info = mlflow.pyfunc.log_model(name="model", **arguments(bundle))
    finally:
        logger.removeFilter(check)
    if check.error is not None:  # nothing of the failed model is left listed in the run
        mlflow.MlflowClient().delete_logged_model(info.model_id)
        raise ServingCheckError(check.error)
    return info
