"""A request's images, decoded within bounds: what :mod:`rcnnops.detect` runs on.

The number of images and the decoded pixels of each are checked from the request
and the image headers before any pixel is decoded (:class:`ImageLimits`). An image
larger than the model works at is reduced to that size as soon as it is decoded,
the way the model's own transform reduces an image in training and evaluation
(torch's bilinear at torchvision's scale factor, in float, a channel at a time),
so the served model sees the pixels the evaluated one saw, and neither the tensors
nor selective search ever see more pixels than the model would use
(:class:`Picture` keeps the size as sent, the frame answers are returned in).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_MAX_SIDE = 16384  # pixels on the longer side (model_config max_image_side)
DEFAULT_MAX_PIXELS = 50_000_000  # decoded pixels per image (model_config max_image_pixels)
DEFAULT_MAX_IMAGES = 16  # images per request (model_config max_images)
MAX_ASPECT = 64  # longer side / shorter side; beyond, a detector sees a line, not an image


class InputError(ValueError):
    """A request that is not a batch of valid images (the server answers HTTP 400)."""


class TooLarge(InputError):
    """A request or image over a limit (the server answers HTTP 413)."""


@dataclass(frozen=True)
class ImageLimits:
    """What one request may hold. ``max_images`` per request; ``max_pixels`` decoded
    pixels and ``max_side`` pixels on the longer side per image, both read from the
    image header before decoding."""

    max_images: int = DEFAULT_MAX_IMAGES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_side: int = DEFAULT_MAX_SIDE

    @classmethod
    def from_config(cls, config: dict) -> ImageLimits:
        """From a pyfunc ``model_config`` (keys ``max_images``, ``max_image_pixels``,
        ``max_image_side``; absent ones keep their defaults)."""
        keys = {"max_images": "max_images", "max_pixels": "max_image_pixels",
                "max_side": "max_image_side"}  # fmt: skip
        return cls(**{f: int(config[k]) for f, k in keys.items() if config.get(k) is not None})

    def check(self, h: int, w: int, where: str) -> None:
        if h < 1 or w < 1:
            raise InputError(f"{where}: empty image ({w}x{h})")
        if max(h, w) > self.max_side:
            raise TooLarge(
                f"{where}: image is {w}x{h} pixels; the limit is {self.max_side} on the longer "
                "side (max_image_side)"
            )
        if h * w > self.max_pixels:
            raise TooLarge(
                f"{where}: image is {w}x{h} = {h * w:,} pixels; the limit is "
                f"{self.max_pixels:,} (max_image_pixels)"
            )
        if max(h, w) > MAX_ASPECT * min(h, w):
            raise InputError(
                f"{where}: image is {w}x{h}, more than {MAX_ASPECT}:1; crop or pad it first"
            )


@dataclass
class Picture:
    """A decoded image ``pixels`` (``uint8 [h, w, 3]``, possibly reduced) and the
    ``size`` ``(H, W)`` of the image as sent, the frame detections are returned in.
    A reduced image also keeps ``exact``, its float pixels (``[3, h, w]`` in [0, 1])
    before rounding to 8 bits: what the model's transform would have made of the
    image as sent, and what the model is given."""

    pixels: np.ndarray
    size: tuple[int, int]
    exact: Any = None  # torch.Tensor when reduced

    @property
    def scale(self) -> tuple[float, float]:
        """``(sy, sx)``: original pixels per decoded pixel."""
        h, w = self.pixels.shape[:2]
        return self.size[0] / h, self.size[1] / w


def _scale(h: int, w: int, fit: tuple[int, int]) -> float:
    # torchvision's GeneralizedRCNNTransform at inference, to the same float
    return min(fit[0] / min(h, w), fit[1] / max(h, w))


def fitted_size(h: int, w: int, fit: tuple[int, int] | None) -> tuple[int, int]:
    """The size ``(h, w)`` an image is resized to by a detector that works at
    ``fit = (min_size, max_size)`` when that is a reduction, otherwise ``(h, w)``:
    torchvision's rule and arithmetic (shorter side to ``min_size`` unless the
    longer side would pass ``max_size``; each side times that scale, floored, as
    ``torch.nn.functional.interpolate`` sizes its output)."""
    if fit is None:
        return h, w
    scale = _scale(h, w, fit)
    if scale >= 1.0:
        return h, w
    return max(1, math.floor(h * scale)), max(1, math.floor(w * scale))


def fit_array(arr: np.ndarray, fit: tuple[int, int] | None) -> Picture:
    """``uint8 [h, w, 3]`` pixels as the model's transform would reduce them, when
    they are larger than ``fit`` (see :func:`fitted_size`): in float, each channel
    through torch's bilinear at torchvision's scale factor (no antialiasing), then
    scaled to [0, 1] as training scales its images. A channel at a time: a 50 MP
    photo is 200 MB a float channel. The result is ``exact``; ``pixels`` its 8-bit
    rounding (for selective search)."""
    h, w = arr.shape[:2]
    nh, nw = fitted_size(h, w, fit)
    if (nh, nw) == (h, w):
        return Picture(arr, (h, w))
    import torch

    scale = _scale(h, w, fit)
    view = torch.from_numpy(arr)  # [h, w, 3]: each channel read in place, one at a time
    exact = torch.empty(3, nh, nw)
    for c in range(3):
        exact[c] = torch.nn.functional.interpolate(
            view[..., c].float()[None, None], scale_factor=scale, mode="bilinear",
            recompute_scale_factor=True, align_corners=False,
        )[0, 0]  # fmt: skip
    exact.div_(255.0)  # bilinear is linear: the same pixels as scaling first, to float rounding
    pixels = exact.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)
    return Picture(pixels.contiguous().numpy(), (h, w), exact)


def decode_base64_image(
    value: str | bytes, where: str, limits: ImageLimits, fit: tuple[int, int] | None = None
) -> Picture:
    """A base64-encoded image file (PNG, JPEG, ...) -> :class:`Picture` (RGB).

    The size is checked from the header, before any pixel is decoded; an image
    larger than ``fit`` (see :func:`fitted_size`) is reduced to that size as soon
    as it is decoded (:func:`fit_array`)."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise InputError(f"{where}: not base64 (expected a base64-encoded image file)") from None
    from rcnnops.data.io import shown_array

    try:
        with Image.open(io.BytesIO(raw)) as im:
            w, h = im.size
            limits.check(h, w, where)  # first: from the header alone (the limits are
            # the same turned); a bomb's header may be all there is to read
            # The image as shown (EXIF orientation applied), decoded in full, as
            # training reads it; its frame is the one detections come back in. No
            # JPEG reduced-scale decoding: its pixels are not the full image's.
            return fit_array(shown_array(im), fit)
    except InputError:
        raise
    except Image.DecompressionBombError:  # Pillow's own guard, before our check runs
        raise TooLarge(
            f"{where}: the image header claims over {2 * Image.MAX_IMAGE_PIXELS:,} pixels; "
            f"the limit is {limits.max_pixels:,} (max_image_pixels)"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InputError(
            f"{where}: not an image file ({len(raw)} bytes decoded from base64 are not "
            "PNG, JPEG or another format Pillow reads)"
        ) from None


def as_uint8_image(value: Any, where: str, limits: ImageLimits) -> np.ndarray:
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
    limits.check(arr.shape[0], arr.shape[1], where)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InputError(f"{where}: pixel array of {arr.dtype}; expected uint8 values 0..255")
    if arr.size and (arr.min() < 0 or arr.max() > 255 or not np.all(np.mod(arr, 1) == 0)):
        raise InputError(f"{where}: pixel values must be integers in 0..255")
    return arr.astype(np.uint8)


def _missing(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, float) and math.isnan(value)


def images_from_input(
    model_input: Any, limits: ImageLimits | None = None, fit: tuple[int, int] | None = None
) -> list[Picture]:
    """A request's images as :class:`Picture` s, decoded one at a time and each
    reduced to ``fit`` (see :func:`fitted_size`) as soon as it is decoded.

    ``model_input``: a DataFrame (or dict of columns) with an ``image`` column of
    base64-encoded image files and/or an ``array`` column of ``[H, W, 3]`` uint8
    pixel arrays (one of the two per row); or a plain list of such values.
    """
    limits = limits or ImageLimits()
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
    uneven = {c: len(columns[c]) for c in usable if len(columns[c]) != n}
    if uneven:
        sizes = ", ".join(f"{c!r} {len(columns[c])}" for c in usable)
        raise InputError(f"the columns hold different numbers of rows: {sizes}")
    if n == 0:
        raise InputError("the request holds no images")
    if n > limits.max_images:
        raise TooLarge(
            f"the request holds {n} images; the limit is {limits.max_images} (max_images)"
        )
    images = []
    for i in range(n):
        where = f"input row {i}"
        value = next((columns[c][i] for c in usable if not _missing(columns[c][i])), None)
        if value is None:
            raise InputError(f"{where}: no image (empty 'image' and 'array')")
        if isinstance(value, str | bytes):
            images.append(decode_base64_image(value, where, limits, fit))
        else:
            images.append(fit_array(as_uint8_image(value, where, limits), fit))
    return images
