"""Reading dataset files safely: JSON, image paths under a root, pixels and sizes.

Every failure becomes a :class:`DataError` whose message names the file (and,
where the caller gives one, the record), never a bare Pillow or OS error.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps

from rcnnops.data.pixels import allow_pixels
from rcnnops.errors import UserError

if TYPE_CHECKING:  # torch loads where a tensor is made: the flow's process never needs it
    import torch

# Ids become int64 tensors and numpy arrays (pycocotools): they must fit.
MAX_ID = 2**63 - 1
# Images above this many pixels are refused (``prepare.max_image_pixels``).
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
# What the refusal tells the user to raise (the importers have an option instead).
PARAMS_LIMIT = "prepare.max_image_pixels in params.yaml"


class DataError(UserError, ValueError):
    """Invalid dataset input. The message names the file and the record."""


def short(v: Any, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters (a bad record can be huge)."""
    try:
        text = repr(v)
    except ValueError:  # an int too long to print
        text = f"<{type(v).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_json(path: Path) -> Any:
    """Parse a JSON file, turning any failure into a :class:`DataError` naming it."""
    try:
        text = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise DataError(f"{path}: not valid JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int too long
        raise DataError(f"{path}: not valid JSON: {e}") from None


def safe_image_path(root: Path, file_name: Any, where: str) -> Path:
    """Resolve ``file_name`` under ``root``; refuse names that escape it.

    Absolute paths, ``..`` components and symlinks pointing outside ``root``
    are all refused (a dataset must not read arbitrary files).
    """
    if not isinstance(file_name, str) or not file_name.strip():
        raise DataError(f"{where}: 'file_name' must be a non-empty string, got {short(file_name)}")
    bad = "it contains a NUL character" if "\0" in file_name else None
    try:
        os.fsencode(file_name)
    except UnicodeEncodeError as e:  # e.g. a lone surrogate: no file can have this name
        bad = e.reason
    if bad:
        raise DataError(f"{where}: file_name {short(file_name)} is not a valid path: {bad}")
    rel = Path(file_name)
    if rel.is_absolute() or ".." in rel.parts:
        raise DataError(f"{where}: file_name {short(file_name)} escapes the image folder {root}")
    try:
        root_resolved = Path(root).resolve()
        path = (Path(root) / rel).resolve()
    except (OSError, RuntimeError) as e:  # name too long, symlink loop
        raise DataError(f"{where}: file_name {short(file_name)} cannot be resolved: {e}") from None
    if not path.is_relative_to(root_resolved):
        raise DataError(
            f"{where}: file_name {short(file_name)} resolves outside the image folder {root} "
            f"(symlink to {path})"
        )
    return path


def load_image_array(path: Path | BinaryIO) -> np.ndarray:
    """Read an image as ``uint8 [H, W, 3]`` RGB (EXIF-rotated; grey, CMYK,
    palette and 16-bit images converted). Errors name the file."""
    if isinstance(path, str | os.PathLike) and os.path.exists(path) and not os.path.isfile(path):
        raise DataError(f"{path}: cannot read image: not a regular file")  # a FIFO would block
    errors = _pillow_errors(f"{path}: image file not found", f"{path}: cannot read image")
    with errors, Image.open(path) as im:
        return shown_array(im)


def shown_array(im: Image.Image) -> np.ndarray:
    """An opened image as shown (its EXIF orientation applied, in place: a 12 MP
    photo's copy is 36 MB) -> :func:`rgb_array`."""
    ImageOps.exif_transpose(im, in_place=True)
    return rgb_array(im)


def rgb_array(im: Image.Image) -> np.ndarray:
    """A decoded Pillow image as ``uint8 [H, W, 3]`` RGB: 16-bit (or int/float)
    greyscale scaled to 8 bit first (Pillow's own conversion clips it, making a
    16-bit photo nearly white), every other mode converted by Pillow."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr16 = np.asarray(im, dtype=np.float32)
        peak = 65535.0 if arr16.size and arr16.max() > 255 else 255.0
        grey = np.clip(arr16 / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    rgb = im if im.mode == "RGB" else im.convert("RGB")  # converting to its own mode copies
    return np.asarray(rgb, dtype=np.uint8).copy()


@contextmanager
def _pillow_errors(not_found: str, unreadable: str) -> Iterator[None]:
    """Pillow's many failures on missing, damaged or huge files as one
    :class:`DataError` (``unreadable`` + why)."""
    try:
        yield
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(not_found) from None
    except Image.DecompressionBombError as e:
        raise DataError(f"{unreadable}: too many pixels: {e}") from None
    except Exception as e:  # Pillow raises many types for damaged files
        raise DataError(f"{unreadable}: {str(e) or type(e).__name__}") from None


def load_image(path: Path) -> torch.Tensor:
    """Read an image as ``float32 [3, H, W]`` in [0, 1] (see :func:`load_image_array`)."""
    import torch

    return torch.from_numpy(load_image_array(path)).permute(2, 0, 1).float().div_(255.0)


def stored_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of the pixels as stored, before any EXIF rotation; None if
    the header cannot be read. For error messages."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def image_size(
    path: Path,
    where: str,
    max_pixels: int | None = None,
    decode: bool = False,
    setting: str = PARAMS_LIMIT,
) -> tuple[int, int]:
    """(width, height) after EXIF rotation, reading only the header; with
    ``decode`` also every pixel (at reduced scale where the format allows), so a
    truncated or corrupt file fails here, not mid-training. Images of more than
    ``max_pixels`` are refused before any decoding; the error says to raise
    ``setting``."""
    missing, unreadable = f"{where}: image {path} not found", f"{where}: image {path} is unreadable"
    allow_pixels(max_pixels)
    with _pillow_errors(missing, unreadable), warnings.catch_warnings():
        # Pillow warns of a possible bomb above its limit: the check below decides
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(path)
    with _pillow_errors(missing, unreadable), im:
        w, h = im.size
        if max_pixels is not None and w * h > max_pixels:
            raise DataError(
                f"{where}: image {path} is {w}x{h} = {w * h} pixels, above the limit of "
                f"{max_pixels} (raise {setting} to accept it)"
            )
        orientation = im.getexif().get(0x0112, 1)
        if decode:
            im.draft("RGB", (max(1, w // 8), max(1, h // 8)))  # JPEG: decode at 1/8 scale
            im.load()
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
