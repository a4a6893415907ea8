"""Prepared COCO splits as torch data: the detection Dataset (and the label map,
:mod:`rcnnops.data.labels`, re-exported).

Boxes are converted from COCO ``[x, y, w, h]`` to ``(x1, y1, x2, y2)`` absolute
pixels here, at the boundary; everything else uses xyxy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from rcnnops.data.io import DataError, load_image, safe_image_path
from rcnnops.data.labels import LabelMap  # noqa: F401 (re-exported: its old home)
from rcnnops.data.masks import decode


class DetectionDataset(Dataset):
    """A prepared COCO split as ``(image [3, H, W] in [0, 1], target)`` samples.

    ``target`` holds ``boxes`` float32 ``[N, 4]`` xyxy pixels, ``labels`` int64
    1..K, ``image_id`` (the COCO id), ``iscrowd`` int64 ``[N]`` and ``area``.
    Crowd regions are dropped when ``skip_crowd`` (torchvision detectors do not
    model them; COCOeval handles them from the ground-truth file).
    ``proposals(image_id) -> Tensor[N, 4]`` (xyxy, this image's frame), when
    given, adds ``target["proposals"]`` before ``transform``, which maps
    ``(image, target) -> (image, target)`` and so moves them with the image.
    ``masks=True`` adds ``target["masks"]`` uint8 ``[N, H, W]`` decoded from the
    annotations' polygons or RLE (every non-crowd annotation needs one).
    """

    def __init__(
        self,
        coco: dict,
        image_root: Path,
        labels: LabelMap,
        transform: Any = None,
        skip_crowd: bool = True,
        proposals: Any = None,
        masks: bool = False,
    ) -> None:
        self.image_root = Path(image_root)
        self.masks = masks
        self.labels = labels
        self.transform = transform
        self.proposals = proposals
        self.images = sorted(coco["images"], key=lambda im: im["id"])
        by_image: dict[int, list[dict]] = {im["id"]: [] for im in self.images}
        for a in coco["annotations"]:
            if skip_crowd and a.get("iscrowd", 0):
                continue
            by_image[a["image_id"]].append(a)
        self.anns = by_image
        if masks:
            missing = [
                a["id"] for anns in by_image.values() for a in anns if not a.get("segmentation")
            ]
            if missing:
                raise DataError(
                    f"{len(missing)} annotation(s) have no 'segmentation' (first ids: "
                    f"{missing[:5]}); mask variants need an instance mask for every object"
                )

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> Path:
        im = self.images[index]
        return safe_image_path(self.image_root, im["file_name"], f"image id {im['id']}")

    def gt_boxes(self, index: int) -> torch.Tensor:
        """Ground-truth boxes ``[N, 4]`` xyxy of one image, without reading its pixels."""
        anns = self.anns[self.images[index]["id"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        return boxes

    def gt_masks(self, index: int) -> torch.Tensor:
        """Instance masks ``uint8 [N, H, W]`` of one image, in annotation order."""
        im = self.images[index]
        w, h = im["width"], im["height"]
        masks = [decode(a["segmentation"], w, h) for a in self.anns[im["id"]]]
        if not masks:
            return torch.zeros((0, h, w), dtype=torch.uint8)
        return torch.from_numpy(np.stack(masks))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        im = self.images[index]
        path = self.image_path(index)
        image = load_image(path)
        if tuple(image.shape[1:]) != (im["height"], im["width"]):
            raise DataError(
                f"{path}: image is {image.shape[2]}x{image.shape[1]} but its record "
                f"(image id {im['id']}) says {im['width']}x{im['height']}"
            )
        anns = self.anns[im["id"]]
        target = {
            "boxes": self.gt_boxes(index),
            "labels": torch.tensor(
                [self.labels.label(a["category_id"]) for a in anns], dtype=torch.int64
            ),
            "image_id": torch.tensor(im["id"], dtype=torch.int64),
            "iscrowd": torch.tensor([a.get("iscrowd", 0) for a in anns], dtype=torch.int64),
            "area": torch.tensor([float(a["area"]) for a in anns], dtype=torch.float32),
        }
        if self.masks:
            target["masks"] = self.gt_masks(index)
        if self.proposals is not None:
            target["proposals"] = self.proposals(im["id"])
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


def collate(batch: list) -> tuple[list, list]:
    """Detection batches are lists (images differ in size)."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
