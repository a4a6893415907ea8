"""Detection on raw images: what the served model and ``rcnnops predict`` run.

Pure code (no MLflow): decode a request's images, run a trained detector
(computing selective-search proposals on the fly for the variants that need
them), and turn its output into plain, JSON-ready detections:
``boxes`` ``[[x1, y1, x2, y2], ...]`` in pixels of the image as sent,
``labels`` (contiguous ids 1..K), ``names``, ``scores`` and, when the model
returns masks (Mask R-CNN), ``masks`` as COCO RLE ``{"size": [h, w],
"counts": str}`` of the mask probabilities thresholded at 0.5.

Bounded by construction: requests are decoded by :mod:`rcnnops.request_images`
(limits checked before any pixel is decoded, images fitted to the model's size);
the request's score threshold is applied before Mask R-CNN pastes its masks;
images run one at a time, and a deadline is checked between them.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rcnnops.request_images import (  # noqa: F401 (the served model's request contract)
    DEFAULT_MAX_IMAGES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SIDE,
    ImageLimits,
    InputError,
    Picture,
    TooLarge,
    as_uint8_image,
    decode_base64_image,
    fit_array,
    fitted_size,
    images_from_input,
)

SERVING_FILE = "serving.json"  # in a model bundle: proposal settings for the served model


class DeadlineExceeded(RuntimeError):
    """The request's deadline passed between two images; the rest were not computed."""


def encode_masks(masks: Any, size: tuple[int, int] | None = None) -> list[dict]:
    """``float [N, 1, h, w]`` mask probabilities -> COCO RLE dicts (``counts`` a str),
    binarised by :func:`~rcnnops.data.masks.binarize`; ``size`` ``(H, W)``: first
    resized (bilinear) to that frame, one mask at a time."""
    import torch

    from rcnnops.data.masks import binarize, encode

    masks = torch.as_tensor(np.asarray(masks, dtype=np.float32))
    out = []
    for m in masks:  # one at a time: a full-size float mask can be tens of MB
        if size is not None and tuple(m.shape[-2:]) != tuple(size):
            m = torch.nn.functional.interpolate(m[None], size=size, mode="bilinear")[0]
        out.append(encode(binarize(m[0].numpy())))
    return out


def to_detections(
    output: dict, names: tuple[str, ...], score_threshold: float, picture: Picture | None = None
) -> dict:
    """One image's model output (tensors) -> JSON-ready detections above the
    threshold, in the frame of ``picture.size`` when the model saw it downscaled."""
    import torch

    scores = output["scores"].detach().float().cpu()
    keep = scores >= score_threshold
    labels = output["labels"].detach().cpu()[keep].tolist()
    boxes = output["boxes"].detach().float().cpu()[keep]
    size = None
    if picture is not None and picture.size != tuple(picture.pixels.shape[:2]):
        sy, sx = picture.scale
        boxes = boxes * torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
        size = picture.size
    det = {
        "boxes": [[round(v, 2) for v in b] for b in boxes.tolist()],
        "labels": labels,
        "names": [names[lab - 1] for lab in labels],
        "scores": [round(s, 4) for s in scores[keep].tolist()],
    }
    if "masks" in output:
        det["masks"] = encode_masks(output["masks"].detach().float().cpu()[keep].numpy(), size)
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
    lock: Any = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_dir(cls, model_dir: Path, device: str = "auto") -> Detector:
        """Load ``model.pt`` + ``model.json`` (+ ``serving.json``: proposal settings,
        ``svd_rank``) from a bundle onto ``device`` (``auto``: CUDA when present)."""
        from rcnnops.data.labels import LabelMap
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

    @property
    def fit(self) -> tuple[int, int] | None:
        """``(min_size, max_size)`` the model rescales images to (its transform)."""
        transform = getattr(self.model, "transform", None)
        if transform is None:
            return None
        min_size = transform.min_size
        return int(min_size[-1] if isinstance(min_size, list | tuple) else min_size), int(
            transform.max_size
        )

    def _proposals(self, pixels: np.ndarray) -> Any:
        import torch

        from rcnnops.proposals.selective_search import selective_search

        return torch.from_numpy(selective_search(pixels, **self.proposals)[0]).to(self.device)

    def _forward(self, tensor: Any, proposals: Any, score_threshold: float, fitted: bool) -> dict:
        """One image through the model with the request's threshold as the heads'
        score threshold, so nothing below it is decoded or pasted (Mask R-CNN pastes
        each kept mask at full image size). A ``fitted`` image is already at the
        size the model's transform would resize it to: the transform is told that
        size, so it keeps the pixels as they are (its own rule, applied to the
        reduced size, can be a pixel off and resample them again). One forward at a
        time per model: both are set on the shared model."""
        import torch

        heads, transform = self.model.roi_heads, getattr(self.model, "transform", None)
        with self.lock, torch.no_grad():
            before = heads.score_thresh
            heads.score_thresh = max(before, score_threshold)
            if fitted:  # (w, h), as torchvision takes it
                fixed, transform.fixed_size = transform.fixed_size, tuple(tensor.shape[:0:-1])
            try:
                if proposals is None:
                    return self.model([tensor])[0]
                return self.model([tensor], proposals=[proposals])[0]
            finally:
                heads.score_thresh = before
                if fitted:
                    transform.fixed_size = fixed

    def __call__(
        self,
        images: list[np.ndarray | Picture],
        score_threshold: float = 0.5,
        deadline: float | None = None,
    ) -> list[dict]:
        """Detections for ``uint8 [H, W, 3]`` images or :class:`Picture` s (see the
        module docstring), one image at a time; ``deadline`` (``time.monotonic()``)
        passed before an image: :class:`DeadlineExceeded`."""
        import torch

        out = []
        for i, image in enumerate(images):
            picture = image if isinstance(image, Picture) else fit_array(image, self.fit)
            _check_deadline(deadline, i, len(images))
            fitted = picture.exact is not None
            if fitted:  # reduced as the model's transform would: its float pixels
                tensor = picture.exact.to(self.device)
            else:  # uint8 to the device (a quarter of the bytes), then to float there
                tensor = torch.from_numpy(picture.pixels).to(self.device)
                tensor = tensor.permute(2, 0, 1).float().div(255.0)
            proposals = None
            if self.proposals is not None:
                proposals = self._proposals(picture.pixels)
                _check_deadline(deadline, i, len(images))
            output = self._forward(tensor, proposals, score_threshold, fitted)
            out.append(to_detections(output, self.names, score_threshold, picture))
        return out


def _check_deadline(deadline: float | None, done: int, total: int) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded(
            f"the request's time limit passed after {done} of {total} image(s); "
            "the rest were not computed"
        )
