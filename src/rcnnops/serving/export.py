"""Exporting a registered version to TorchScript or ONNX, checked against the
eager model before anything is written.

What is exported is the network torchvision's detectors export: one image
``float [3, H, W]`` in [0, 1], any size, in; ``boxes [N, 4]`` (xyxy pixels of the
input), ``labels [N]`` (1..K), ``scores [N]`` (and ``masks [N, 1, H, W]``
probabilities for Mask R-CNN) out, after the model's own resizing, NMS and score
threshold. Before export the model is put in torchvision's exportable form,
numerically the same: the autocast-only fp32 anchors and hooks are dropped
(no-ops in fp32), and the class is torchvision's ``FasterRCNN`` / ``MaskRCNN``
(ours only adds a check that no proposals are passed).

- TorchScript: ``torch.jit.script`` (torchvision's detectors are scriptable,
  tracing would freeze the detection count); every backbone here scripts.
- ONNX: ``torch.onnx.export`` (TorchScript-based exporter, opset 17, torchvision's
  ONNX rules) with dynamic height and width, run with ONNX Runtime.
- R-CNN and Fast R-CNN are not exported: their proposals come from OpenCV's
  selective search, outside the network (and R-CNN warps each crop in a loop).

For ONNX the transform's resize is traced by output size (:func:`_resize_by_size`):
torchvision traces a scale factor, which ONNX Runtime applies without PyTorch's
recomputation, so any image size but the traced one gave other pixels.

Parity (:mod:`.parity`): on validation images, the export's detections must
equal the eager model's: same count and labels, boxes within 0.5 px, scores within
1e-3, mask IoU >= 0.99. A failed check writes nothing.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rcnnops.errors import UserError
from rcnnops.serving.parity import BOX_TOL, MASK_IOU, SCORE_TOL, ParityRow, parity, parity_table

__all__ = ["ExportError", "FILE", "Runner", "export_bundle", "export_version", "parity_table"]

FORMATS = ("torchscript", "onnx")
EXPORTABLE = ("faster_rcnn", "mask_rcnn")
FILE = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx"}


class ExportError(UserError, RuntimeError):
    """A variant or format that cannot be exported, or an export that failed parity."""


def check_exportable(variant: str, fmt: str) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if variant not in EXPORTABLE:
        raise ExportError(
            f"{variant} cannot be exported to {fmt}: its proposals come from selective "
            "search (OpenCV), outside the network"
            + (
                ", and it warps and classifies each crop in a Python loop"
                if variant == "rcnn"
                else ""
            )
            + f"; exportable variants: {', '.join(EXPORTABLE)}"
        )


def exportable(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in torchvision's exportable form (see the module docstring)."""
    from torchvision.models.detection import faster_rcnn, mask_rcnn
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    from rcnnops.models.proposals import Fp32Anchors

    model = copy.deepcopy(model).eval()
    for module in list(model.modules()):
        module._forward_hooks.clear()  # the fp32 casts of models/fp32.py: no-ops in fp32
        for name, child in list(module.named_children()):
            if isinstance(child, Fp32Anchors):
                setattr(module, name, AnchorGenerator(child.sizes, child.aspect_ratios))
    base = mask_rcnn.MaskRCNN if isinstance(model, mask_rcnn.MaskRCNN) else faster_rcnn.FasterRCNN
    model.__class__ = base
    return model


def _outputs(variant: str) -> list[str]:
    return ["boxes", "labels", "scores"] + (["masks"] if variant == "mask_rcnn" else [])


def write_torchscript(model: nn.Module, path: Path) -> None:
    try:
        scripted = torch.jit.script(exportable(model))
    except Exception as e:  # a backbone written with Python TorchScript cannot compile
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(
            f"torchscript: this model cannot be scripted ({first}); export it to onnx"
        ) from None
    scripted.save(str(path))


def _resize_by_size(transform: nn.Module, image: torch.Tensor, target: Any = None) -> tuple:
    """``GeneralizedRCNNTransform.resize`` at inference, traceable to the same pixels.

    torchvision traces its resize as a scale factor; ONNX Runtime samples with that
    scale, PyTorch with the one recomputed from the rounded size, so every size but
    the traced one came out different. Here the output size is computed in integers
    (``floor(side * min_size / shorter)``, or by ``max_size / longer`` when that is
    smaller: the eager rule without float rounding) and passed as a size."""
    import torch.nn.functional as F

    shape = torch._shape_as_tensor(image)[-2:]
    lo, hi = int(transform.min_size[-1]), int(transform.max_size)
    short, long = shape.min(), shape.max()
    by_short = lo * long <= hi * short
    num = torch.where(by_short, torch.tensor(lo), torch.tensor(hi))
    den = torch.where(by_short, short, long)
    size = torch.div(shape * num, den, rounding_mode="floor")
    out = F.interpolate(image[None], size=[size[0], size[1]], mode="bilinear",
                        align_corners=False)[0]  # fmt: skip
    return out, target


def write_onnx(model: nn.Module, variant: str, example: torch.Tensor, path: Path) -> None:
    import types
    import warnings

    model = exportable(model)
    model.transform.resize = types.MethodType(_resize_by_size, model.transform)
    names = _outputs(variant)
    dynamic = {"image": {1: "height", 2: "width"}} | {n: {0: "detections"} for n in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python scalars
        torch.onnx.export(
            model, ([example],), str(path), opset_version=17, dynamo=False,
            input_names=["image"], output_names=names, dynamic_axes=dynamic,
        )  # fmt: skip


class Runner:
    """Runs an exported file on one image tensor -> dict of tensors."""

    def __init__(self, fmt: str, path: Path, variant: str) -> None:
        self.fmt, self.names = fmt, _outputs(variant)
        if fmt == "torchscript":
            self.module = torch.jit.load(str(path)).eval()
        else:
            import onnxruntime as ort

            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def __call__(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.fmt == "torchscript":
            with torch.no_grad():
                return self.module([image])[1][0]
        arrays = self.session.run(None, {"image": image.numpy()})
        return {n: torch.from_numpy(a) for n, a in zip(self.names, arrays, strict=True)}


README = """# {name} v{version} as {fmt}

Exported by `rcnnops export {variant} --format {fmt}` from the registered
version {version} (`models:/{name}/{version}`, run {run_id}).

Input: one image `float32 [3, H, W]`, RGB in [0, 1], any size (the network
resizes it to {min_size} px on the shorter side, at most {max_size} on the longer).
Outputs, for that image, after NMS and the score threshold {score_thresh}:
- `boxes float32 [N, 4]`: x1, y1, x2, y2 in pixels of the input image
- `labels int64 [N]`: class ids 1..{k}: {classes}
- `scores float32 [N]`{mask_line}

Parity with the eager model on {n} validation images: same detections, boxes
within {box_tol} px, scores within {score_tol}{mask_tol} (parity.json).

{usage}
"""

USAGE = {
    "onnx": """Run it with ONNX Runtime:

```python
import numpy as np, onnxruntime as ort
from PIL import Image, ImageOps
session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
photo = ImageOps.exif_transpose(Image.open("photo.jpg"))  # as shown
if photo.mode.startswith("I;16"):  # 16-bit grey: Pillow's convert("RGB") would clip it
    image = np.repeat(np.asarray(photo, np.float32)[None] / 65535, 3, axis=0)
else:
    image = np.asarray(photo.convert("RGB"), np.float32).transpose(2, 0, 1) / 255
boxes, labels, scores, *masks = session.run(None, {"image": image})
```""",
    "torchscript": """Run it with PyTorch (no rcnnops needed), or TorchServe:

```python
import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import to_dtype
model = torch.jit.load("model.torchscript.pt").eval()
# RGB (a grey, RGBA or 16-bit file too), turned as its EXIF orientation says (as rcnnops
# reads it); to [0, 1] by the file's own range (a 16-bit PNG decodes as uint16)
image = decode_image("photo.jpg", mode=ImageReadMode.RGB, apply_exif_orientation=True)
image = to_dtype(image, torch.float32, scale=True)
losses, (detections,) = model([image])   # detections: boxes, labels, scores[, masks]
```""",
}


def write_readme(out: Path, fmt: str, variant: str, name: str, version: str, run_id: str,
                 model: nn.Module, names: tuple[str, ...], n: int) -> None:  # fmt: skip
    t = model.transform
    masks = variant == "mask_rcnn"
    text = README.format(
        name=name, version=version, fmt=fmt, variant=variant, run_id=run_id,
        min_size=t.min_size[-1], max_size=t.max_size, score_thresh=model.roi_heads.score_thresh,
        k=len(names), classes=", ".join(f"{i} {c}" for i, c in enumerate(names, 1)),
        mask_line="\n- `masks float32 [N, 1, H, W]`: mask probabilities (> 0.5 is the mask)"
        if masks else "",
        n=n, box_tol=BOX_TOL, score_tol=SCORE_TOL,
        mask_tol=f", mask IoU >= {MASK_IOU}" if masks else "", usage=USAGE[fmt],
    )  # fmt: skip
    (out / "README.md").write_text(text)


def export_bundle(
    model: nn.Module, variant: str, fmt: str, images: list[tuple[str, torch.Tensor]], out: Path
) -> list[ParityRow]:
    """Export ``model`` into ``out`` (created only when parity holds on ``images``);
    returns the parity rows. :class:`ExportError` (with the table) otherwise."""
    check_exportable(variant, fmt)
    if out.exists():
        raise ExportError(f"{out} exists; remove it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        path = tmp / FILE[fmt]
        if fmt == "torchscript":
            write_torchscript(model, path)
        else:
            write_onnx(model, variant, images[0][1], path)
        rows = parity(model, Runner(fmt, path, variant), images)
        if not all(r.ok for r in rows):
            raise ExportError(f"{fmt} export differs from the eager model; nothing written:\n"
                              + parity_table(rows))  # fmt: skip
        (tmp / "parity.json").write_text(json.dumps([r.__dict__ for r in rows], indent=2))
        tmp.rename(out)
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def validation_images(prepared: Path, project: Path, n: int = 10) -> list[tuple[str, Any]]:
    """The first ``n`` images of the prepared validation split as tensors, plus a
    crop of the first (80 % of its height, 60 % of its width): the export must hold
    at sizes other than the one it was traced at."""
    from rcnnops.data.io import load_image

    coco = json.loads((prepared / "val.json").read_text())
    root = project / coco.get("rcnnops", {}).get("image_root", "")
    images = sorted(coco["images"], key=lambda im: im["id"])[:n]
    if not images:
        raise ExportError(f"{prepared / 'val.json'} has no images to check the export on")
    out = [(im["file_name"], load_image(root / im["file_name"])) for im in images]
    name, first = out[0]
    h, w = first.shape[1:]
    crop = first[:, : max(1, h * 4 // 5), : max(1, w * 3 // 5)].contiguous()
    return out + [(f"{name} cropped", crop)]


def export_version(project: Path, params: Any, variant: str, fmt: str,
                   version: str | None, out: Path | None) -> tuple[Path, list, str]:  # fmt: skip
    """Export ``rcnnops-<variant>`` v``version`` (default: the champion) into ``out``
    (default ``exports/<variant>-v<N>-<fmt>``), log it as an artifact of the
    version's run (``exports/<fmt>``) and tag the version ``export.<fmt>``."""
    import mlflow

    from rcnnops import registry, tracking
    from rcnnops.detect import Detector

    check_exportable(variant, fmt)
    tracking.setup(params.register.experiment)
    name = registry.model_name(variant)
    if version is None:
        mv = registry.resolve(variant, registry.CHAMPION, params.register.experiment)
    else:
        mv = registry.get_version(name, str(version))
    version = str(mv.version)
    out = out or project / "exports" / f"{variant}-v{version}-{fmt}"
    with tempfile.TemporaryDirectory(prefix="rcnnops-export-") as tmp:
        uri = f"models:/{name}/{version}"
        local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=tmp))
        bundle = next(local.rglob("model_dir"), None)
        if bundle is None:
            raise ExportError(
                f"{uri}: no model files in its artifact store (moved or deleted?); "
                "register the model again with `rcnnops register`"
            )
        detector = Detector.from_dir(bundle, "cpu")
    images = validation_images(project / params.prepare.out, project)
    rows = export_bundle(detector.model, variant, fmt, images, out)
    run_id = mv.run_id or ""
    write_readme(out, fmt, variant, name, version, run_id, detector.model, detector.names,
                 len(images))  # fmt: skip
    client = tracking.client()
    if run_id:
        client.log_artifacts(run_id, str(out), artifact_path=f"exports/{fmt}")
        where = f"runs:/{run_id}/exports/{fmt}"
    else:
        where = str(out)
    client.set_model_version_tag(name, version, f"export.{fmt}", where)
    return out, rows, where
