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


def test_prepare_reads_photos_up_to_the_params_limit_whatever_pillows_guard(
    tiny_project, capsys, monkeypatch
):
    """Pillow refuses images of more than twice ``Image.MAX_IMAGE_PIXELS`` (about
    179 M pixels) as possible decompression bombs, so raising
    ``prepare.max_image_pixels`` above that had no effect. Here Pillow's guard is
    made small (1000 pixels) and the 64 px images stand for the large ones: the
    params' limit is what counts, in this process and in the proposals' workers."""
    from PIL import Image

    from rcnnops.data.pixels import pillow_limit
    from rcnnops.params_edit import set_params
    from rcnnops.proposals.precompute import search_pool

    assert main(["-C", str(tiny_project), "generate"]) == 0
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    limits = {"prepare.max_image_pixels": 5000, "serve.max_image_pixels": 4096}
    set_params(tiny_project / "params.yaml", limits)
    assert main(["-C", str(tiny_project), "prepare"]) == 0, capsys.readouterr().err
    assert Image.MAX_IMAGE_PIXELS == 5000
    with search_pool(1) as pool:  # spawned: they would start with Pillow's default
        assert pool.submit(pillow_limit).result() == 5000
    set_params(tiny_project / "params.yaml", {"prepare.max_image_pixels": 4000})
    assert main(["-C", str(tiny_project), "prepare"]) == 2
    err = capsys.readouterr().err
    assert "64x64 = 4096 pixels is above the limit of 4000 (raise prepare.max_image_pixels" in err


def test_run_refuses_an_unknown_variant_at_once(tiny_project, capsys):
    """A typo in `run --variants` ran generate and prepare, then failed at DVC's
    `train@<typo>` with a traceback; it stops before anything runs now."""
    from pipelines.cli import main as pipeline_main

    assert pipeline_main(["-C", str(tiny_project), "run", "--variants", "fastr_rcnn"]) == 2
    err = capsys.readouterr().err
    assert "error: --variants: unknown fastr_rcnn (variants: rcnn, fast_rcnn, " in err
    assert not (tiny_project / "data").exists()


def test_data_folder_is_read_from_the_shells_folder_with_dash_c(tmp_path, monkeypatch):
    """`rcnnops -C proj run --data single`: ``single`` is where the shell is, as any
    command-line path; it was looked for inside proj."""
    from rcnnops.cli import _from_project

    monkeypatch.chdir(tmp_path)
    (tmp_path / "proj" / "data").mkdir(parents=True)
    assert _from_project("single", "proj") == str(tmp_path / "single")
    assert _from_project("proj/data/coco", "proj") == "data/coco"  # inside: portable
    monkeypatch.chdir(tmp_path / "proj")
    assert _from_project("data/coco", ".") == "data/coco"


def test_registry_commands_say_at_once_that_the_tracking_server_is_down(
    tiny_project, capsys, monkeypatch
):
    """With MLFLOW_TRACKING_URI on a server that does not answer, MLflow's client
    retried for about 4 minutes in silence, then `models` printed a traceback; every
    command that reads the registry now says so in one line, at once."""
    import time

    from rcnnops.serving.process import free_port

    monkeypatch.chdir(tiny_project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    commands = [
        ["models"], ["compare"], ["register", "faster_rcnn"], ["promote", "faster_rcnn", "1"],
        ["rollback", "faster_rcnn"], ["predict", "faster_rcnn", "x.png"],
        ["export", "faster_rcnn", "--format", "onnx"],
    ]  # fmt: skip
    for argv in commands:
        t0 = time.monotonic()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "does not answer" in err and "Traceback" not in err, (argv, err)
        assert time.monotonic() - t0 < 30, argv


def test_serve_and_predict_flags_are_checked_as_params_are(tiny_project, capsys, monkeypatch):
    """`--poll-s 0` made the server poll the registry in a loop at 100 % CPU, and
    `--max-images 0` failed inside Python ('range() arg 3 must not be zero'): the
    flags skipped the checks params.yaml's values get."""
    monkeypatch.chdir(tiny_project)
    for argv, said in (
        (["serve", "faster_rcnn", "--poll-s", "0"], "--poll-s: Input should be greater than 0"),
        (["predict", "faster_rcnn", "x.png", "--max-images", "0"], "--max-images: Input should"),
        (["serve", "faster_rcnn", "--max-queue", "-1"], "--max-queue: Input should be greater"),
    ):
        assert main(argv) == 2, argv
        assert said in capsys.readouterr().err, argv


def test_a_ctrl_c_as_a_finished_command_exits_prints_no_traceback():
    """SIGINT landing in the exit handlers (torch's, MLflow's) printed a 30-line
    KeyboardInterrupt traceback after a rollback had finished."""
    code = (
        "import atexit, os, signal, time\n"
        "from rcnnops.cli import exit_now\n"
        "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.2)))\n"
        "exit_now(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert (done.returncode, done.stderr) == (3, "")
