"""Pillow's decompression-bomb guard, set to what the user allowed.

rcnnops refuses images above its own limits (``prepare.max_image_pixels``,
``serve.max_image_pixels``, the importers' ``--max-image-pixels``) from their
headers, before decoding. Pillow has a guard of its own, a warning above
``Image.MAX_IMAGE_PIXELS`` (about 89 M) and an error above twice that, which
would refuse what the user allowed: a 200 M-pixel aerial photo failed with
"could be decompression bomb DOS attack" whatever the params said. A light
module (Pillow only): every command that reads params sets the guard.
"""

from __future__ import annotations

from PIL import Image


def allow_pixels(limit: int | None) -> None:
    """Let Pillow open images of up to ``limit`` pixels in this process, with
    no warning (see the module docstring). Never lowers Pillow's limit; ``None``
    leaves it as it is."""
    if limit is not None and Image.MAX_IMAGE_PIXELS is not None:
        Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS, int(limit))


def pillow_limit() -> int | None:
    """Pillow's limit in this process, for a child process to take (see
    :func:`set_pillow_limit`)."""
    return Image.MAX_IMAGE_PIXELS


def set_pillow_limit(value: int | None) -> None:
    """A pool's initializer: the parent's Pillow limit (:func:`pillow_limit`)."""
    Image.MAX_IMAGE_PIXELS = value
