"""Exports: `rcnnops export` on a registered version (parity printed, logged and
tagged; nothing written when refused), and both formats for Faster and Mask
R-CNN, trained (small backbone) and on a torchvision backbone, parity asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rcnnops.cli import main
from rcnnops.models import build_model
from rcnnops.serving import export
from tests.code.trained import inside, train_and_register, write_project

# Trains and exports (about 45 s): in the scale suite, which CI runs; the default
# suite keeps the refusals below.
SCALE = pytest.mark.scale


def test_what_cannot_be_exported_is_refused_plainly():
    with pytest.raises(export.ExportError, match="unknown export format 'tflite'"):
        export.check_exportable("faster_rcnn", "tflite")
    for variant in ("rcnn", "fast_rcnn"):
        with pytest.raises(export.ExportError, match="selective search \\(OpenCV\\)"):
            export.check_exportable(variant, "onnx")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = write_project(tmp_path_factory.mktemp("export") / "project", ["mask_rcnn"])
    assert train_and_register(root, ["mask_rcnn"]) == {"mask_rcnn": "1"}
    return root


@SCALE
def test_export_command_writes_checks_logs_and_tags(project, capsys):
    with inside(project):
        assert main(["export", "mask_rcnn", "--format", "onnx"]) == 0
        out = capsys.readouterr().out
        assert main(["export", "mask_rcnn", "--format", "torchscript", "--version", "1"]) == 0
    assert "parity holds on 9 validation images" in out and "| yes |" in out
    assert "000017.png cropped | 51x38 |" in out  # another size than the traced one
    folder = project / "exports/mask_rcnn-v1-onnx"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "model.onnx", "parity.json"]
    rows = json.loads((folder / "parity.json").read_text())
    assert len(rows) == 9 and all(r["same_count_labels"] for r in rows)
    assert all(r["box_diff"] <= 0.5 and r["score_diff"] <= 1e-3 for r in rows)
    assert all(r["mask_iou"] is None or r["mask_iou"] >= 0.99 for r in rows)
    assert "onnxruntime" in (folder / "README.md").read_text()
    assert (project / "exports/mask_rcnn-v1-torchscript/model.torchscript.pt").is_file()
    from rcnnops import tracking

    with inside(project):
        mv = tracking.client().get_model_version("rcnnops-mask_rcnn", "1")
        for fmt, file in (("onnx", "model.onnx"), ("torchscript", "model.torchscript.pt")):
            assert mv.tags[f"export.{fmt}"] == f"runs:/{mv.run_id}/exports/{fmt}"
            logged = [a.path for a in tracking.client().list_artifacts(mv.run_id, f"exports/{fmt}")]
            assert f"exports/{fmt}/{file}" in logged
        # refused plainly, nothing written
        assert main(["export", "rcnn", "--format", "onnx"]) == 2
        assert main(["export", "mask_rcnn", "--format", "onnx"]) == 2  # exists already
        assert main(["export", "mask_rcnn", "--format", "onnx", "--version", "7"]) == 2
    err = capsys.readouterr().err
    assert "rcnn cannot be exported to onnx: its proposals come from selective search" in err
    assert "exists; remove it" in err and "has no version 7" in err
    assert sorted(p.name for p in (project / "exports").iterdir()) == [
        "mask_rcnn-v1-onnx", "mask_rcnn-v1-torchscript",
    ]  # fmt: skip
    # each export's README code runs as written, on files as users have them: RGBA,
    # stored turned with an EXIF orientation (it was a shape error for TorchScript),
    # and a 16-bit grey PNG (Pillow's convert clipped it white, torchvision's uint16
    # divided by 255 was up to 257): the input is the tensor rcnnops reads
    import numpy as np
    from PIL import Image

    from rcnnops.data.io import load_image

    (first,) = sorted((project / "data/raw/shapes/val").glob("*.png"))[:1]
    exif = Image.Exif()
    exif[0x0112] = 6
    with Image.open(first) as im:
        im.convert("RGBA").transpose(Image.Transpose.ROTATE_90).save(project / "p.png", exif=exif)
        grey = np.asarray(im.convert("L"), np.uint16) * 257
    Image.fromarray(grey).save(project / "deep.png")  # Pillow: mode I;16
    show = "import torch\nread = torch.load('../x.pt')\n"
    show += "print(tuple(image.shape), float((torch.as_tensor(image) - read).abs().max()))\n"
    for photo in ("p.png", "deep.png"):
        torch.save(load_image(project / photo), project / "exports" / "x.pt")
        for folder in ("mask_rcnn-v1-onnx", "mask_rcnn-v1-torchscript"):
            readme = (project / "exports" / folder / "README.md").read_text()
            code = readme.split("```python\n", 1)[1].split("```", 1)[0]
            code = code.replace('"photo.jpg"', repr(str(project / photo)))
            done = subprocess.run(
                [sys.executable, "-c", code + show],
                cwd=project / "exports" / folder, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr[-2000:]
            *shape, diff = done.stdout.split()[-4:]
            assert shape == ["(3,", f"{im.height},", f"{im.width})"], (photo, folder)
            assert float(diff) <= 1 / 255 + 1e-6, (photo, folder)  # rcnnops rounds to 8 bits
    (project / "exports" / "x.pt").unlink()


def trained(project: Path, variant: str) -> torch.nn.Module:
    """The project's trained Mask R-CNN (small backbone); as ``faster_rcnn``, the
    same network without its mask branch (the trained backbone, RPN and box head)."""
    from rcnnops.models.io import load_model

    mask, meta = load_model(project / "models/mask_rcnn")
    if variant == "mask_rcnn":
        return mask
    params = {k: v for k, v in meta["model_params"].items() if not k.startswith("mask_")}
    model = build_model("faster_rcnn", meta["num_classes"], params).eval()
    missing, _ = model.load_state_dict(mask.state_dict(), strict=False)
    assert not missing
    return model


@SCALE
@pytest.mark.parametrize("variant", ["faster_rcnn", "mask_rcnn"])
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exports_match_the_eager_model_at_any_size(project, variant, fmt, tmp_path):
    """Trained weights, the validation images and a crop of another size than the
    one an ONNX graph is traced at."""
    model = trained(project, variant)
    images = export.validation_images(project / "data/prepared", project)
    rows = export.export_bundle(model, variant, fmt, images, tmp_path / "out")
    print("\n" + export.parity_table(rows))
    assert len(rows) == 9 and all(r.ok for r in rows) and rows[-1].size == "51x38"
    assert sum(r.detections for r in rows) > 0  # something was compared


@pytest.mark.parametrize("variant", ["faster_rcnn", "mask_rcnn"])
@pytest.mark.scale
def test_torchscript_with_a_torchvision_backbone(project, variant, tmp_path):
    """mobilenet_v3_fpn, weights=None, on the validation images. (Not the crop, and
    not ONNX: this untrained network ties scores, and NMS then keeps either of
    equal boxes, differently in each runtime; trained weights do not tie.)"""
    torch.manual_seed(0)
    params = {"backbone": "mobilenet_v3_fpn", "min_size": 96, "max_size": 128,
              "box_score_thresh": 0.05}  # fmt: skip
    model = build_model(variant, 4, params).eval()
    images = export.validation_images(project / "data/prepared", project)[:-1]
    rows = export.export_bundle(model, variant, "torchscript", images, tmp_path / "out")
    print("\n" + export.parity_table(rows))
    assert len(rows) == 8 and all(r.ok for r in rows)
    assert sum(r.detections for r in rows) > 0
    assert (tmp_path / "out" / export.FILE["torchscript"]).is_file()


@SCALE
def test_a_failed_parity_check_writes_nothing(project, tmp_path, monkeypatch):
    model = build_model("faster_rcnn", 4, {"backbone": "mobilenet_v3_fpn", "min_size": 96,
                                          "max_size": 128}).eval()  # fmt: skip
    real = export.Runner.__call__

    def off_by_a_pixel(self, image):
        out = real(self, image)
        out["boxes"] = out["boxes"] + 1.0
        return out

    monkeypatch.setattr(export.Runner, "__call__", off_by_a_pixel)
    images = export.validation_images(project / "data/prepared", project)[:2]
    with pytest.raises(export.ExportError, match="differs from the eager model; nothing written"):
        export.export_bundle(model, "faster_rcnn", "onnx", images, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
