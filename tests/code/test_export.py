"""Exports: `rcnnops export` on a registered version (ONNX, parity printed, logged
and tagged; nothing written when refused), and both formats for Faster and Mask
R-CNN on torchvision backbones (TorchScript needs one), parity asserted."""

from __future__ import annotations

import json

import pytest
import torch

from rcnnops.cli import main
from rcnnops.models import build_model
from rcnnops.serving import export
from tests.code.trained import inside, train_and_register, write_project


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = write_project(tmp_path_factory.mktemp("export") / "project", ["mask_rcnn"])
    assert train_and_register(root, ["mask_rcnn"]) == {"mask_rcnn": "1"}
    return root


def test_export_command_writes_checks_logs_and_tags(project, capsys):
    with inside(project):
        assert main(["export", "mask_rcnn", "--format", "onnx"]) == 0
    out = capsys.readouterr().out
    assert "parity holds on 8 validation images" in out and "| yes |" in out
    folder = project / "exports/mask_rcnn-v1-onnx"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "model.onnx", "parity.json"]
    rows = json.loads((folder / "parity.json").read_text())
    assert len(rows) == 8 and all(r["same_count_labels"] for r in rows)
    assert all(r["box_diff"] <= 0.5 and r["score_diff"] <= 1e-3 for r in rows)
    assert all(r["mask_iou"] is None or r["mask_iou"] >= 0.99 for r in rows)
    assert "onnxruntime" in (folder / "README.md").read_text()
    from rcnnops import tracking

    with inside(project):
        mv = tracking.client().get_model_version("rcnnops-mask_rcnn", "1")
        assert mv.tags["export.onnx"] == f"runs:/{mv.run_id}/exports/onnx"
        logged = [a.path for a in tracking.client().list_artifacts(mv.run_id, "exports/onnx")]
        assert "exports/onnx/model.onnx" in logged
        # refused plainly, nothing written
        assert main(["export", "mask_rcnn", "--format", "torchscript"]) == 2
        assert main(["export", "rcnn", "--format", "onnx"]) == 2
        assert main(["export", "mask_rcnn", "--format", "onnx"]) == 2  # exists already
    err = capsys.readouterr().err
    assert "'small' backbone is not scriptable" in err
    assert "rcnn cannot be exported to onnx: its proposals come from selective search" in err
    assert "exists; remove it" in err
    assert not (project / "exports/mask_rcnn-v1-torchscript").exists()
    assert [p.name for p in (project / "exports").iterdir()] == ["mask_rcnn-v1-onnx"]


@pytest.mark.parametrize("variant", ["faster_rcnn", "mask_rcnn"])
@pytest.mark.parametrize("fmt", ["torchscript"])
def test_both_formats_match_the_eager_model(project, variant, fmt, tmp_path):
    """A torchvision backbone (mobilenet_v3_fpn, weights=None): scripted detections
    equal the eager model's on the validation images. (ONNX is checked on the
    small backbone above; with FPN backbones its parity fails today and the
    command refuses to write it: an open defect, see serving/export.py.)"""
    torch.manual_seed(0)
    params = {
        "backbone": "mobilenet_v3_fpn",
        "min_size": 96,
        "max_size": 128,
        "box_score_thresh": 0.05,
    }  # untrained: fewer near-ties at the bottom
    model = build_model(variant, 4, params).eval()
    images = export.validation_images(project / "data/prepared", project)
    rows = export.export_bundle(model, variant, fmt, images, tmp_path / "out")
    print("\n" + export.parity_table(rows))
    assert len(rows) == 8 and all(r.ok for r in rows)
    assert sum(r.detections for r in rows) > 0  # something was compared
    assert (tmp_path / "out" / export.FILE[fmt]).is_file()


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
