"""The `rcnnops` command: help, stage commands, clear errors (exit 2, no traceback)."""

import subprocess
import sys

from pipelines.cli import add_parsers as orchestration
from rcnnops.cli import build_parser, main


def test_help_lists_commands():
    text = build_parser((orchestration,)).format_help()
    for cmd in (
        "run",
        "schedule",
        "generate",
        "prepare",
        "train",
        "evaluate",
        "register",
        "promote",
        "models",
    ):
        assert cmd in text
    assert "MLFLOW_TRACKING_URI" in text


def test_console_script_help():
    out = subprocess.run(
        [sys.executable, "-m", "rcnnops.cli", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--variant" in out


def test_generate_and_prepare_commands(tiny_project, capsys):
    assert main(["-C", str(tiny_project), "generate"]) == 0
    assert main(["-C", str(tiny_project), "prepare"]) == 0
    out = capsys.readouterr().out
    assert "train: 16 images" in out and "val: 8 images" in out
    assert (tiny_project / "data/prepared/manifest.json").is_file()


def test_bad_params_exit_2_with_message(tiny_project, capsys):
    (tiny_project / "params.yaml").write_text("train: {faster_rcnn: {lr: fast}}\n")
    assert main(["-C", str(tiny_project), "prepare"]) == 2
    err = capsys.readouterr().err
    assert "train.faster_rcnn.lr: expected a number, got 'fast'" in err
    assert "Traceback" not in err


def test_training_without_prepared_data_says_how_to_fix(tiny_project, capsys):
    assert main(["-C", str(tiny_project), "train", "--variant", "faster_rcnn"]) == 2
    assert "dvc repro prepare" in capsys.readouterr().err
