"""Detection on raw images: what the served model and ``rcnnops predict`` run.

Pure code (no MLflow): decode a request's images, run a trained detector
(computing selective-search proposals on the fly for the variants that need
them), and turn its output into plain, JSON-ready detections:
``boxes`` ``[[x1, y1, x2, y2], ...]`` in pixels of the image as sent,
``labels`` (contiguous ids 1..K), ``names``, ``scores`` and, when the model
returns masks (Mask R-CNN), ``masks`` as COCO RLE ``{"size": [h, w],
"counts": str}`` of the mask probabilities thresholded at 0.5.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_MAX_SIDE = 4096  # pixels; longer images are refused (model_config max_image_side)
SERVING_FILE = "serving.json"  # in a model bundle: proposal settings for the served model


class InputError(ValueError):
    """A request that is not a batch of valid images (the server answers HTTP 400)."""


def _check_side(h: int, w: int, where: str, max_side: int) -> None:
    if h < 1 or w < 1:
        raise InputError(f"{where}: empty image ({w}x{h})")
    if max(h, w) > max_side:
        raise InputError(
            f"{where}: image is {w}x{h} pixels; the limit is {max_side} on the longer side "
            "(model_config max_image_side)"
        )


def decode_base64_image(value: str | bytes, where: str, max_side: int) -> np.ndarray:
    """A base64-encoded image file (PNG, JPEG, ...) -> ``uint8 [H, W, 3]`` RGB.

    The size is checked from the header, before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise InputError(f"{where}: not base64 (expected a base64-encoded image file)") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            w, h = im.size
            _check_side(h, w, where, max_side)
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"{where}: image too large ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InputError(
            f"{where}: not an image file ({len(raw)} bytes decoded from base64 are not "
            "PNG, JPEG or another format Pillow reads)"
        ) from None


def as_uint8_image(value: Any, where: str, max_side: int) -> np.ndarray:
    """An array-like of pixels, ``[H, W, 3]`` RGB or ``[H, W]`` grey, values
    0..255 -> ``uint8 [H, W, 3]``."""
    try:
        arr = np.asarray(value)
        if arr.dtype == object:  # ragged nested lists, e.g. from a JSON payload
            arr = np.stack([np.stack([np.asarray(px) for px in row]) for row in value])
    except (ValueError, TypeError):
        raise InputError(f"{where}: pixel array is ragged; expected [H, W, 3]") from None
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise InputError(f"{where}: pixel array has shape {list(arr.shape)}; expected [H, W, 3]")
    _check_side(arr.shape[0], arr.shape[1], where, max_side)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InputError(f"{where}: pixel array of {arr.dtype}; expected uint8 values 0..255")
    if arr.size and (arr.min() < 0 or arr.max() > 255 or not np.all(np.mod(arr, 1) == 0)):
        raise InputError(f"{where}: pixel values must be integers in 0..255")
    return arr.astype(np.uint8)


def _missing(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, float) and math.isnan(value)


def images_from_input(model_input: Any, max_side: int = DEFAULT_MAX_SIDE) -> list[np.ndarray]:
    """A request's images, each ``uint8 [H, W, 3]``.

    ``model_input``: a DataFrame (or dict of columns) with an ``image`` column of
    base64-encoded image files and/or an ``array`` column of ``[H, W, 3]`` uint8
    pixel arrays (one of the two per row); or a plain list of such values.
    """
    if hasattr(model_input, "columns"):
        columns = {c: list(model_input[c]) for c in model_input.columns}
    elif isinstance(model_input, dict):
        columns = {
            k: list(v) if isinstance(v, list | tuple) else [v] for k, v in model_input.items()
        }
    elif isinstance(model_input, list | tuple):
        columns = {"value": list(model_input)}
    else:
        raise InputError(
            f"expected a table with an 'image' column (base64 image files) or an 'array' "
            f"column (uint8 [H, W, 3]), got {type(model_input).__name__}"
        )
    usable = [c for c in ("image", "array", "value") if c in columns]
    if not usable:
        raise InputError(
            "no 'image' column (base64-encoded image files) or 'array' column "
            f"(uint8 [H, W, 3] pixels) in the request; got {', '.join(sorted(columns)) or 'none'}"
        )
    n = len(columns[usable[0]])
    if n == 0:
        raise InputError("the request holds no images")
    images = []
    for i in range(n):
        where = f"input row {i}"
        value = next((columns[c][i] for c in usable if not _missing(columns[c][i])), None)
        if value is None:
            raise InputError(f"{where}: no image (empty 'image' and 'array')")
        if isinstance(value, str | bytes):
            images.append(decode_base64_image(value, where, max_side))
        else:
            images.append(as_uint8_image(value, where, max_side))
    return images


def encode_masks(masks: Any) -> list[dict]:
    """``float [N, 1, H, W]`` mask probabilities -> COCO RLE dicts (``counts`` a str),
    binarised by :func:`~rcnnops.data.masks.binarize`."""
    from rcnnops.data.masks import binarize, encode

    binary = binarize(np.asarray(masks, dtype=np.float32)[:, 0])
    return [encode(m) for m in binary]


def to_detections(output: dict, names: tuple[str, ...], score_threshold: float) -> dict:
    """One image's model output (tensors) -> JSON-ready detections above the threshold."""
    scores = output["scores"].detach().float().cpu()
    keep = scores >= score_threshold
    labels = output["labels"].detach().cpu()[keep].tolist()
    det = {
        "boxes": [[round(v, 2) for v in b] for b in output["boxes"].detach().cpu()[keep].tolist()],
        "labels": labels,
        "names": [names[lab - 1] for lab in labels],
        "scores": [round(s, 4) for s in scores[keep].tolist()],
    }
    if "masks" in output:
        det["masks"] = encode_masks(output["masks"].detach().float().cpu()[keep].numpy())
    return det


@dataclass
class Detector:
    """A trained model ready for raw images. ``proposals`` holds the selective
    search settings for the variants that need precomputed proposals."""

    model: Any
    variant: str
    names: tuple[str, ...]
    proposals: dict | None = None
    device: Any = "cpu"  # a torch.device

    @classmethod
    def from_dir(cls, model_dir: Path, device: str = "auto") -> Detector:
        """Load ``model.pt`` + ``model.json`` (+ ``serving.json``: proposal settings,
        ``svd_rank``) from a bundle onto ``device`` (``auto``: CUDA when present)."""
        from rcnnops.data.dataset import LabelMap
        from rcnnops.device import resolve_device
        from rcnnops.models import USES_PROPOSALS
        from rcnnops.models.io import load_model, require_meta

        model_dir = Path(model_dir)
        serving_path = model_dir / SERVING_FILE
        serving = json.loads(serving_path.read_text()) if serving_path.is_file() else {}
        where = resolve_device(device)
        model, meta = load_model(model_dir, where, svd_rank=serving.get("svd_rank"))
        require_meta(meta, model_dir / "model.json", ("labels",))  # the class names served
        settings = serving.get("proposals")
        if meta["variant"] in USES_PROPOSALS and settings is None:
            settings = {}  # the selective search defaults
        names = LabelMap.from_json(meta["labels"]).names
        return cls(model, meta["variant"], names, settings, where)

    def _proposals(self, images: list[np.ndarray]) -> list | None:
        if self.proposals is None:
            return None
        import torch

        from rcnnops.proposals.selective_search import selective_search

        return [torch.from_numpy(selective_search(im, **self.proposals)[0]) for im in images]

    def __call__(self, images: list[np.ndarray], score_threshold: float = 0.5) -> list[dict]:
        """Detections for ``uint8 [H, W, 3]`` images (see the module docstring)."""
        import torch

        tensors = [
            torch.from_numpy(im).to(self.device).permute(2, 0, 1).float().div(255.0)
            for im in images
        ]  # uint8 to the device (a quarter of the bytes), then to float there
        proposals = self._proposals(images)
        if proposals is not None:
            proposals = [p.to(self.device) for p in proposals]
        with torch.no_grad():
            if proposals is None:
                outputs = self.model(tensors)
            else:
                outputs = self.model(tensors, proposals=proposals)
        return [to_detections(out, self.names, score_threshold) for out in outputs]
