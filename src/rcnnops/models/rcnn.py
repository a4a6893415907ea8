"""R-CNN (Girshick et al., 2014): every proposal cropped from the image with
context padding, warped to a fixed size and classified by a CNN of its own.

The variant's difference from the shared parts: RoI "features" are warped
image crops (:class:`WarpCrops`) fed through a whole CNN (:class:`CropNet`)
instead of pooled backbone features, so the network runs once per proposal
(the cost Fast R-CNN removes). Sampling (fg IoU >= 0.5, bg [0.1, 0.5), 25 %
foreground), K+1-way classification, class-specific ``(t_x, t_y, t_w, t_h)``
box regression and per-class NMS are the shared :class:`roi.ProposalRoIHeads`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign, roi_align

from rcnnops.models import backbones, roi
from rcnnops.models.fast_rcnn import FastRCNN
from rcnnops.models.proposals import PrecomputedProposals
from rcnnops.models.svm import SVMPredictor, mine_svm, ridge


def expand_boxes(boxes: torch.Tensor, warp_size: int, context: int) -> torch.Tensor:
    """Grow ``[N, 4]`` xyxy boxes about their centres so that, once warped to
    ``warp_size``, ``context`` pixels of surroundings show on every side
    (the paper: 16 px at 227)."""
    if context == 0:
        return boxes
    factor = warp_size / (warp_size - 2 * context)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) / 2 * factor
    return torch.cat([centre - half, centre + half], dim=1)


class WarpCrops(MultiScaleRoIAlign):
    """Crop each proposal (with context) out of the *image* and warp it to
    ``warp_size x warp_size`` by bilinear resampling; outside the image is 0
    (the mean colour after normalisation, as the paper pads with the mean).

    Same call as a RoI pooler: ``(features, boxes, image_sizes)`` with
    ``features["image"]`` the normalised image batch ``[B, 3, H, W]``; returns
    ``[sum N_i, 3, warp_size, warp_size]``. (Subclasses ``MultiScaleRoIAlign``
    only because torchvision's ``RoIHeads`` type-checks its pooler.)
    """

    def __init__(self, warp_size: int = 227, context: int = 16) -> None:
        super().__init__(["image"], warp_size, sampling_ratio=2)
        if not 0 <= 2 * context < warp_size:
            raise ValueError(f"context {context} leaves nothing of a {warp_size}px warp")
        self.warp_size, self.context = warp_size, context

    def forward(self, features, boxes, image_sizes):
        images = features["image"]
        grown = [expand_boxes(b.to(images.dtype), self.warp_size, self.context) for b in boxes]
        return roi_align(
            images, grown, self.warp_size, spatial_scale=1.0, sampling_ratio=2, aligned=True
        )


class CropNet(nn.Module):
    """The per-proposal CNN: ``[R, 3, S, S]`` crops -> ``[R, representation]``.

    ``body`` is the small from-scratch CNN (``crop_net: small``) or an ImageNet
    classification network without its head (``resnet18``, ``resnet50``,
    ``mobilenet_v3``: the paper fine-tunes an ImageNet CNN, AlexNet or VGG16),
    followed by global average pooling and one FC layer. Runs in chunks of
    ``chunk`` crops so testing 2000 proposals per image stays within memory.
    """

    def __init__(self, body: nn.Module, representation: int = 256, chunk: int = 512) -> None:
        super().__init__()
        self.body = body
        self.fc = nn.Sequential(
            nn.Flatten(1), nn.Linear(body.out_channels, representation), nn.ReLU(inplace=True)
        )
        self.chunk = chunk

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        outs = []
        for part in crops.split(self.chunk) if len(crops) else [crops]:
            fmap = self.body(part)
            if isinstance(fmap, dict):  # the small backbone's {"0": map}
                fmap = fmap["0"]
            outs.append(self.fc(fmap.mean(dim=(2, 3))))
        return torch.cat(outs)


def crop_body(crop_net: str, width: int, norm: str, pretrained: bool) -> nn.Module:
    """R-CNN's per-crop CNN body by name (see :class:`CropNet`)."""
    if crop_net == "small":
        return backbones.SmallBackbone(
            width=width,
            out_channels=4 * width,
            stride=8,
            norm=backbones.norm_layer(norm, pretrained),
        )
    return backbones.classification_body(crop_net, norm, pretrained)


class _ImageAsFeatures(nn.Module):
    """The R-CNN "backbone": passes the normalised image through as ``{"image": x}``."""

    out_channels = 3

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict([("image", x)])


class SVMRoIHeads(roi.ProposalRoIHeads):
    """R-CNN heads whose test-time scores and boxes can come from the paper's
    per-class SVMs and ridge regressors (``self.svm``) once they are trained."""

    def __init__(self, *args, representation: int, num_classes: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.svm = SVMPredictor(representation, num_classes)

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training or not bool(self.svm.trained):
            return super().forward(features, proposals, image_shapes, targets)
        x = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        margins, deltas = self.svm(x)
        boxes = self.box_coder.decode(deltas, proposals)
        # Each class's SVM scores boxes independently: a sigmoid, not a softmax.
        scores = torch.sigmoid(margins)
        result = []
        for b, sc, shape in zip(
            boxes.split([len(p) for p in proposals]),
            scores.split([len(p) for p in proposals]),
            image_shapes,
            strict=True,
        ):
            result.append(self._select(b, sc, shape))
        return result, {}

    def _select(self, boxes, scores, shape):
        from torchvision.ops import boxes as box_ops

        boxes = box_ops.clip_boxes_to_image(boxes, shape)[:, 1:].reshape(-1, 4)
        labels = torch.arange(1, scores.shape[1]).expand(len(scores), -1).reshape(-1)
        scores = scores[:, 1:].reshape(-1)
        keep = (scores > self.score_thresh).nonzero().flatten()
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.remove_small_boxes(boxes, 1e-2)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)
        keep = keep[: self.detections_per_img]
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


class RCNN(FastRCNN):
    """Same API as :class:`FastRCNN` (proposals required); only the RoI path differs.

    ``classifier`` (set by :func:`build`): ``softmax`` scores with the fine-tuned
    network's own head; ``svm`` adds the paper's second stage (:meth:`second_stage`).
    """

    classifier: str = "softmax"
    # Where ImageNet classification weights go (rcnnops.models.weights): the crop CNN.
    classification_body = "roi_heads.box_head.body."

    def second_stage(self, samples) -> str | None:
        """Train what follows fine-tuning, if this R-CNN has anything to train.

        With ``classifier == "svm"``: fit the per-class SVMs and ridge box
        regressors (:meth:`fit_svms`, on the CPU, then back on the device the
        model was on) and return ``"svm"`` (the scores to validate again).
        With ``softmax``: nothing to do, return ``None``. ``samples`` as for
        :meth:`fit_svms`.
        """
        if self.classifier != "svm":
            return None
        device = next(self.parameters()).device
        counts = self.cpu().fit_svms(samples)
        self.to(device)
        print(f"trained {len(counts)} per-class SVMs (+ ridge box regressors)")
        return "svm"

    @torch.no_grad()
    def fit_svms(
        self,
        samples,
        c: float = 1.0,
        neg_iou: float = 0.3,
        reg_iou: float = 0.6,
        ridge_lambda: float = 1000.0,
    ) -> dict:
        """The paper's second stage on the fine-tuned CNN's features.

        ``samples`` yields ``(image, target)`` with ``target["proposals"]``.
        Positives: ground-truth boxes of the class; negatives: proposals with
        IoU < ``neg_iou`` with every object of the class (hard-mined). Ridge
        box regression from proposals with IoU >= ``reg_iou``. Returns counts.
        """
        self.eval()
        heads = self.roi_heads
        feats, gt_labels, iou_rows, targets_rows = [], [], [], []
        for image, target in samples:
            x, labels, best, reg_t = self._svm_rows(image, target)
            feats.append(x)
            gt_labels.append(labels)
            iou_rows.append(best)
            targets_rows.append(reg_t)
        x, labels = torch.cat(feats), torch.cat(gt_labels)
        best, reg_t = torch.cat(iou_rows), torch.cat(targets_rows)
        svm, counts = heads.svm, {}
        for cls in range(1, svm.weight.shape[0]):
            pos, neg = x[labels == cls], x[best[:, cls] < neg_iou]
            if len(pos) == 0:
                continue
            w, b, used = mine_svm(pos, neg, c)
            svm.weight[cls], svm.bias[cls] = w, b
            sel = best[:, cls] >= reg_iou
            svm.reg[cls] = ridge(x[sel], reg_t[sel, cls], ridge_lambda)
            counts[cls] = {
                "positives": int(len(pos)),
                "negatives_used": used,
                "regression_samples": int(sel.sum()),
            }
        svm.trained.fill_(True)
        return counts

    def _svm_rows(self, image, target) -> tuple[torch.Tensor, ...]:
        """One image's rows for :meth:`fit_svms`: its ground-truth boxes then its
        proposals, as ``(features [R, D], labels [R] (0 for proposals),
        best IoU with an object of each class [R, K+1], box targets [R, K+1, 4])``."""
        from torchvision.ops import box_iou

        heads = self.roi_heads
        original = [tuple(image.shape[-2:])]
        images, tgts = self.transform(
            [image], [{"boxes": target["boxes"], "labels": target["labels"]}]
        )
        props = self.proposal_source([target["proposals"]], original, images.image_sizes)[0]
        gt = tgts[0]["boxes"]
        boxes = torch.cat([gt, props])
        x = heads.box_head(
            heads.box_roi_pool(self.backbone(images.tensors), [boxes], images.image_sizes)
        )
        labels = torch.zeros(len(boxes), dtype=torch.int64)
        labels[: len(gt)] = tgts[0]["labels"]
        k = heads.svm.weight.shape[0]
        best = torch.zeros(len(boxes), k)  # best IoU with an object of each class
        reg_t = torch.zeros(len(boxes), k, 4)
        if len(gt):
            iou = box_iou(boxes, gt)
            for cls in tgts[0]["labels"].unique().tolist():
                m = tgts[0]["labels"] == cls
                val, idx = iou[:, m].max(dim=1)
                best[:, cls] = val
                reg_t[:, cls] = heads.box_coder.encode_single(gt[m][idx], boxes)
        return x, labels, best, reg_t


def build(
    num_classes: int,
    warp_size: int = 227,
    context: int = 16,
    crop_net: str = "small",
    width: int = 32,
    norm: str = "batch",
    representation_size: int = 256,
    min_size: int = 800,
    max_size: int = 1333,
    proposals_train: int = 2000,
    proposals_test: int = 2000,
    box_batch_size_per_image: int = 64,
    box_positive_fraction: float = 0.25,
    fg_iou: float = 0.5,
    bg_iou_low: float = 0.1,
    box_score_thresh: float = 0.01,
    box_nms_thresh: float = 0.3,
    box_detections_per_img: int = 100,
    crop_chunk: int = 512,
    classifier: str = "softmax",
    pretrained: str | None = None,
) -> RCNN:
    """An R-CNN for ``num_classes`` classes including background (K + 1).

    ``crop_net``: ``small`` (``width`` channels, from scratch) or an ImageNet
    classification body (``resnet18``, ``resnet50``, ``mobilenet_v3``) for
    ``pretrained: torchvision:ResNet50_Weights.IMAGENET1K_V2`` and the like.
    ``classifier: svm`` adds the paper's per-class SVMs + ridge box regression,
    trained after fine-tuning (:meth:`RCNN.second_stage`) and used at test time.
    """
    if classifier not in ("softmax", "svm"):
        raise ValueError(f"classifier must be 'softmax' or 'svm', got {classifier!r}")
    heads = SVMRoIHeads(
        WarpCrops(warp_size, context),
        CropNet(
            crop_body(crop_net, width, norm, pretrained is not None),
            representation_size,
            crop_chunk,
        ),
        FastRCNNPredictor(representation_size, num_classes),
        **roi.proposal_sampling(
            fg_iou,
            bg_iou_low,
            box_batch_size_per_image,
            box_positive_fraction,
            box_score_thresh,
            box_nms_thresh,
            box_detections_per_img,
        ),
        representation=representation_size,
        num_classes=num_classes,
    )
    model = RCNN(
        _ImageAsFeatures(),
        backbones.image_transform(min_size, max_size),
        PrecomputedProposals(proposals_train, proposals_test),
        heads,
    )
    model.classifier = classifier
    return model
