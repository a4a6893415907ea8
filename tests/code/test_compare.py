"""`rcnnops compare`: rows from the project's files and the registry's champion,
every output format, the side-by-side picture and its MLflow run."""

import csv
import io
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from rcnnops import compare, tracking
from rcnnops.cli import main
from rcnnops.config import load_params
from rcnnops.data.prepare import load_split
from tests.conftest import TINY_PARAMS, write_json

METRICS = {
    "bbox_AP": 0.5,
    "bbox_AP50": 0.75,
    "bbox_AP75": 0.5,
    "bbox_APs": 0.25,
    "bbox_APm": -1.0,  # COCOeval's "no objects of that size"
    "bbox_APl": -1.0,
    "infer_ms_per_image": 12.345,
}


@pytest.fixture
def project(tiny_prepared, mlflow_db, tmp_path, monkeypatch):
    """Prepared data, a trained+evaluated faster_rcnn (files only) and a mask_rcnn
    champion in a real MLflow store; the cwd is the project."""
    monkeypatch.chdir(tmp_path)
    params = yaml.safe_load(TINY_PARAMS)
    params["variants"] = ["faster_rcnn", "mask_rcnn"]
    params["prepare"]["out"] = "prepared"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    write_json(
        tmp_path / "models/faster_rcnn/model.json",
        {"train_seconds": 12.5, "parameters": 1234567, "data_hash": "d" * 64, "run_id": "r1"},
    )
    write_json(tmp_path / "reports/faster_rcnn/metrics.json", METRICS)
    coco, _, _ = load_split(tmp_path / "prepared", "val")
    preds = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 0.9,
        }
        for a in coco["annotations"]
    ]
    write_json(tmp_path / "reports/faster_rcnn/predictions.json", preds)

    tracking.setup("rcnnops-test")
    client = tracking.client()
    client.create_registered_model("rcnnops-mask_rcnn")
    (tmp_path / "m").mkdir()
    tags = {
        "metric.bbox_AP": "0.4",
        "metric.segm_AP": "0.35",
        "metric.infer_ms_per_image": "20.0",
        "train_seconds": "30.25",
        "parameters": "2000000",
        "data_hash": "e" * 64,
    }
    mv = client.create_model_version("rcnnops-mask_rcnn", (tmp_path / "m").as_uri(), tags=tags)
    client.set_registered_model_alias("rcnnops-mask_rcnn", "champion", mv.version)
    return tmp_path


def test_rows_from_files_and_registry_in_every_format(project):
    rows = compare.collect(load_params("params.yaml"))
    assert [(r["variant"], r["source"]) for r in rows] == [
        ("faster_rcnn", "latest"),
        ("mask_rcnn", "champion"),
    ]
    latest, champion = rows
    assert latest["AP"] == 0.5 and latest["APm"] is None and latest["segm_AP"] is None
    assert latest["version"] is None  # these weights were never registered
    assert (latest["train_s"], latest["parameters"], latest["infer_ms"]) == (12.5, 1234567, 12.345)
    assert champion["version"] == "1" and champion["segm_AP"] == 0.35
    assert (champion["train_s"], champion["parameters"]) == (30.25, 2000000)

    table = compare.render(rows, "table").splitlines()
    assert table[0].split() == list(compare.TABLE_COLUMNS)
    assert table[1].split() == [
        "faster_rcnn", "latest", "-", "0.500", "0.750", "0.500", "0.250", "-", "-", "-",
        "12.5", "12.3", "1,234,567", "d" * 12,
    ]  # fmt: skip
    assert table[2].split()[:3] == ["mask_rcnn", "champion", "1"]
    assert table[2].split()[9] == "0.350"

    md = compare.render(rows, "markdown").splitlines()
    assert md[0] == "| " + " | ".join(compare.TABLE_COLUMNS) + " |"
    assert md[1] == "|" + "---|" * len(compare.TABLE_COLUMNS)
    assert md[2].startswith("| faster_rcnn | latest | - | 0.500 | 0.750 |")

    parsed = list(csv.DictReader(io.StringIO(compare.render(rows, "csv"))))
    assert list(parsed[0]) == list(compare.COLUMNS)
    assert parsed[0]["APm"] == "" and parsed[0]["run_id"] == "r1"
    assert parsed[1]["segm_AP"] == "0.35" and parsed[1]["data_hash"] == "e" * 64

    assert json.loads(compare.render(rows, "json")) == rows
    with pytest.raises(ValueError, match="unknown format 'xml'"):
        compare.render(rows, "xml")


def test_cli_compare_and_plot(project, capsys):
    assert main(["compare", "--format", "json", "--plot", "--images", "2"]) == 0
    captured = capsys.readouterr()
    assert [r["variant"] for r in json.loads(captured.out)] == ["faster_rcnn", "mask_rcnn"]
    picture = project / "reports/compare/side_by_side.png"
    assert f"wrote {picture.relative_to(project)}" in captured.err
    with Image.open(picture) as im:  # 2 images x (ground truth + faster_rcnn)
        assert im.width > 300 and im.height > 300
    assert main(["compare", "--variants", "rcnn"]) == 0
    assert "nothing to compare yet" in capsys.readouterr().out
    for command in ("compare", "models"):  # a typo is named, not left out without a word
        assert main([command, "--variants", "faster_rcnn", "fasterrcnn"]) == 2
        err = capsys.readouterr().err
        assert "error: --variants: unknown fasterrcnn (variants: rcnn, fast_rcnn, " in err


def test_bad_image_counts_and_damaged_reports_are_named(project, capsys):
    """--images 0 or -100 drew empty axes, -1 dropped the last image, 100000 drew a
    whole validation set; a damaged report was a JSON error naming no file, or a
    traceback (a list where an object belongs)."""
    picture = project / "reports/compare/side_by_side.png"
    for value, why in (("0", "must be 1 to 50, got 0"), ("-1", "must be 1 to 50, got -1"),
                       ("51", "must be 1 to 50, got 51"),
                       ("two", "not a whole number: 'two'")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main(["compare", "--plot", "--images", value])
        assert e.value.code == 2 and f"argument --images: {why}" in capsys.readouterr().err
    assert not picture.exists()
    assert main(["compare", "--images", "2"]) == 0
    assert "--images draws nothing without --plot" in capsys.readouterr().err
    assert not picture.exists()
    reports = project / "reports/faster_rcnn"
    good = (reports / "predictions.json").read_text()
    (reports / "predictions.json").write_text(good[:100])
    assert main(["compare", "--plot"]) == 2
    err = capsys.readouterr().err
    assert "reports/faster_rcnn/predictions.json: not valid JSON" in err and not picture.exists()
    (reports / "predictions.json").write_text(good)
    (reports / "metrics.json").write_text("[]")
    assert main(["compare"]) == 2
    assert "metrics.json: expected an object, found list" in capsys.readouterr().err


def test_the_flow_s_picture_drawn_in_a_process_of_its_own(project):
    """The flow draws the picture in a process of its own (beside registration): the
    same file as drawn here; a bad input stops it with its own one-line message."""
    picture = project / "reports/compare/side_by_side.png"
    drawn = compare.side_by_side_in_a_process(project / "params.yaml", ["faster_rcnn"])
    assert drawn == picture.relative_to(project) and picture.read_bytes()[:4] == b"\x89PNG"
    assert compare.side_by_side_in_a_process(project / "params.yaml", ["rcnn"]) is None
    predictions = project / "reports/faster_rcnn/predictions.json"
    predictions.write_text(predictions.read_text()[:100])
    with pytest.raises(compare.PictureError) as e:
        compare.side_by_side_in_a_process(project / "params.yaml", ["faster_rcnn"])
    assert str(e.value).startswith("reports/faster_rcnn/predictions.json: not valid JSON")
    assert "Traceback" not in str(e.value)


def test_a_large_photo_is_drawn_from_a_small_copy(project, monkeypatch):
    """Each panel is a few hundred pixels wide, yet every photo got a float canvas
    of its full size: one 7000x5000 photo took 4.4 GB."""
    from rcnnops import plots

    sizes = []
    shrunk = plots.shrunk
    monkeypatch.setattr(plots, "shrunk", lambda im, side: sizes.append(im.shape) or
                        shrunk(im, side))  # fmt: skip
    big = (np.arange(2000 * 3000 * 3) % 251).astype(np.uint8).reshape(2000, 3000, 3)
    assert plots.shrunk(big, 1024).shape == (683, 1024, 3)
    coco, root, _ = load_split(project / "prepared", "val")
    first = compare.pick_images(coco, 1)[0]
    Image.fromarray(big).save(root / first["file_name"])  # the first image drawn, now large
    plot = compare.side_by_side(load_params("params.yaml"), n_images=1)
    assert sizes[0] == (2000, 3000, 3)  # handed to shrunk, which draws 683x1024
    with Image.open(plot) as im:
        assert im.width < 1000


def test_comparison_is_logged_to_mlflow_once(project):
    p = load_params("params.yaml")
    rows = compare.collect(p)
    plot = compare.side_by_side(p)
    run_id = compare.log_to_mlflow("rcnnops-test", rows, plot)
    assert run_id is not None
    files = {a.path for a in tracking.client().list_artifacts(run_id)}
    assert files == {"comparison.json", "comparison.md", "side_by_side.png"}
    assert compare.log_to_mlflow("rcnnops-test", rows, plot) is None  # unchanged: not again


def test_help_names_the_daily_commands():
    from rcnnops.cli import build_parser

    text = build_parser().format_help()
    for cmd in ("rollback", "serve", "predict", "compare", "schedule"):
        assert cmd in text
