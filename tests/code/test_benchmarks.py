"""The benchmark harness (the benchmarks themselves are `make bench`, not tests)."""

from __future__ import annotations

import pytest

from benchmarks.__main__ import main, markdown
from benchmarks.common import Split, ab


def test_ab_interleaves_cases_on_each_input_and_drops_the_warmup():
    calls = []
    times = ab(
        {"A": lambda x: calls.append(("A", x)), "B": lambda x: calls.append(("B", x))},
        [0, 1, 2],
        warmup=1,
    )
    assert calls == [("A", 0), ("B", 0), ("A", 1), ("B", 1), ("A", 2), ("B", 2)]
    assert [len(t) for t in times.values()] == [2, 2]
    assert all(t >= 0 for ts in times.values() for t in ts)


def test_split_accumulates_time_inside_wrapped_methods_by_bucket():
    class Thing:
        def work(self, x):
            return x + 1

    thing, split = Thing(), Split()
    split.wrap(thing, "work", "post")
    assert thing.work(1) == 2 and thing.work(2) == 3
    taken = split.take()
    assert list(taken) == ["post"] and taken["post"] > 0
    assert split.take() == {}


def _doc(sections):
    machine = {
        "cpu": "cpu",
        "cores": 2,
        "ram": "1 GiB",
        "cuda": None,
        "platform": "linux",
        "python": "3.11",
        "torch_threads": 2,
        "git": "abc",
        "packages": {"torch": "2"},
    }
    return {
        "command": "python -m benchmarks --quick",
        "quick": True,
        "finished": "now",
        "minutes": 1.0,
        "machine": machine,
        "sections": sections,
    }


def test_markdown_lists_targets_tables_and_failures():
    ok = {
        "title": "8. Pipeline overhead",
        "paper": "-",
        "columns": ["run", "seconds"],
        "rows": [{"run": "no-op", "seconds": 12.345}],
        "targets": [
            {"name": "no-op rerun", "value": "12.3 s", "target": "<= 10 s", "holds": False}
        ],
        "notes": ["a note"],
        "seconds": 3.0,
    }
    bad = {"title": "6. coco_eval", "error": "Traceback ...\nValueError: boom", "seconds": 1.0}
    ok["targets"].append(
        {"name": "overhead", "value": 7.4321, "unit": "%", "target": "<= 10 %", "holds": True}
    )
    md = markdown(_doc([ok, bad]))
    assert "| 8 | no-op rerun | 12.3 s | <= 10 s | **does not hold** |" in md
    assert "| 8 | overhead | 7.43 % | <= 10 % | holds |" in md
    assert "| no-op | 12.3 |" in md
    assert "- a note" in md
    assert "**failed:**" in md and "ValueError: boom" in md
    assert "no GPU (CPU)" in md and "quick mode" in md


def test_target_values_are_numbers_with_units_and_show_with_them():
    from benchmarks.common import check_targets, shown

    assert shown({"value": 53.0893, "unit": "x"}) == "53.1x"
    assert shown({"value": 1944.27, "unit": "x"}) == "1944x"
    assert shown({"value": 0.5123, "unit": "%"}) == "0.512 %"
    assert shown({"value": -0.0258, "unit": "AP"}) == "-0.0258 AP"
    assert shown({"value": 2.2e-16, "unit": ""}) == "2.2e-16"
    assert shown({"value": "+161 %"}) == "+161 %"  # kept from results before units
    assert shown({"value": 1.4213}) == "1.42x" and shown({"value": 0.2212}) == "0.221"
    check_targets({"targets": [{"name": "ok", "value": 1, "unit": "s"}]})
    with pytest.raises(ValueError, match="'mask overhead': value '\\+161 %' is not a number"):
        check_targets({"targets": [{"name": "mask overhead", "value": "+161 %", "unit": "%"}]})
    with pytest.raises(ValueError, match="'fits': value True is not a number"):
        check_targets({"targets": [{"name": "fits", "value": True, "unit": ""}]})
    with pytest.raises(ValueError, match="'speed': no unit"):
        check_targets({"targets": [{"name": "speed", "value": 2.0}]})


def test_a_comparison_with_a_text_target_is_written_as_its_error(tmp_path):
    import json

    from benchmarks.common import write_section

    out = tmp_path / "section.json"
    write_section(
        "x", "1. X", lambda: {"title": "1. X", "targets": [{"name": "t", "value": "2x"}]}, out
    )
    section = json.loads(out.read_text())
    assert "value '2x' is not a number" in section["error"] and section["name"] == "x"


def test_unknown_comparison_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--only", "nope"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown comparison(s) ['nope']" in err and "variants" in err


# -- the paper-scale mode (python -m benchmarks --paper) ---------------------------


def test_fixed_work_is_exactly_n_boxes_cycled_or_cut():
    import torch

    from benchmarks.paper.common import fixed

    boxes = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert torch.equal(fixed(boxes, 7), torch.cat([boxes, boxes, boxes[:1]]))
    assert torch.equal(fixed(boxes, 2), boxes[:2])


def test_paper_photos_are_the_annotated_ones_up_to_the_count(tmp_path):
    import json

    from benchmarks.paper.common import photos

    split = tmp_path / "val"
    split.mkdir()
    for name in ("b.jpg", "a.jpg", "c.png", "unlisted.jpg", "notes.txt"):
        (split / name).write_bytes(b"x")
    (tmp_path / "annotations").mkdir()
    listed = [{"id": i, "file_name": n} for i, n in enumerate(["a.jpg", "b.jpg", "c.png"])]
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps({"images": listed}))
    found, ann = photos(str(split), 2)
    assert [p.name for p in found] == ["a.jpg", "b.jpg"]
    assert ann == tmp_path / "annotations" / "instances_val.json"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no .jpg/.png photos in"):
        photos(str(empty), 2)


def test_overhead_breakdown_charges_each_stretch_to_the_task_that_ended_it():
    """... and nothing to the tasks that ran beside others (the tracking store and the
    warm-up beside the data stages, dvc push beside registration)."""
    from benchmarks.paper.overhead import breakdown

    log = [
        (4.0, "12:00:00 | INFO | Flow run 'x' - Beginning flow run 'x' for flow 'rcnnops'"),
        (5.0, "12:00:01 | INFO | Task run 'ensure-dvc-1a2' - Finished in state Completed()"),
        (6.0, "Running stage 'prepare':"),
        (7.0, "> rcnnops prepare"),
        (8.0, "12:00:04 | INFO | Task run 'tracking-store-e58' - Finished in state Completed()"),
        (9.0, "12:00:05 | INFO | Task run 'warm-up-a1b' - Finished in state Completed()"),
        (10.0, "Updating lock file 'dvc.lock'"),
        (11.5, "12:00:08 | INFO | Task run 'dvc-repro-3b4' - Finished in state Completed()"),
        (12.5, "12:00:09 | INFO | Task run 'dvc-push-00f' - Finished in state Completed()"),
        (13.0, "12:00:09 | INFO | Task run 'register-5c6' - Finished in state Completed()"),
        (14.0, "12:00:10 | INFO | Task run 'register-7d8' - Finished in state Completed()"),
    ]
    parts, commands = breakdown(log, total=16.0)
    assert commands == 3.0
    assert parts == {
        "start: Python, Prefect's API, the flow run": 4.0,
        "DVC repo / remote check": 1.0,
        "DVC around stages": 3.5,
        "MLflow: log model + register (per variant)": 2.5,
        "end: artifacts, run state, Prefect shutdown": 2.0,
    }
    assert sum(parts.values()) + commands == 16.0


def test_paper_markdown_renders_every_table_of_a_row_and_its_targets():
    from benchmarks.paper import markdown as paper_markdown

    doc = _doc(
        [
            {
                "title": "6. Peer",
                "paper": "-",
                "tables": [
                    {
                        "columns": ["detector", "rcnnops / torchvision"],
                        "rows": [{"detector": "a", "rcnnops / torchvision": 1.013}],
                    },
                    {"columns": ["op", "ms"], "rows": [{"op": "roi_align", "ms": 12.0}]},
                ],
                "targets": [
                    {
                        "name": "rcnnops / torchvision inference, a",
                        "value": 1.01,
                        "unit": "x",
                        "target": "<= 1.05",
                        "holds": True,
                    }
                ],
                "notes": ["n"],
                "seconds": 2.0,
            }
        ]
    ) | {"images": 6, "search_images": 18, "source": "coco-mini/val2017"}
    md = paper_markdown(doc)
    assert "| 6 | rcnnops / torchvision inference, a | 1.01x | <= 1.05 | holds |" in md
    assert "| a | 1.01 |" in md and "| roi_align | 12.0 |" in md
    assert "6 photos timed per row (18 for selective search)" in md


def test_paper_mode_has_its_own_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--paper", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--images N|DIR" in out and "rcnn_vs_fast" in out


def test_cpu_beside_the_stage_commands_is_their_share_of_each_interval():
    """The pipeline row's attribution, on made-up samples: a stage command's lifetime
    ends halfway between the last sample that saw it and the next; the rest's CPU in
    an interval counts as beside the stage commands for the part they covered."""
    from benchmarks.common import attribute, lifetimes

    times = [0.0, 1.0, 2.0, 3.0, 4.0]
    # one command from 0.5 s, last seen at 2.0 s (gone at 3.0: it ended at 2.5); its child
    # from 1.2 s, last seen at 2.0 too (one window, not two); another from 3.25 s
    windows = lifetimes([[0.5, 2.0], [1.2, 2.0], [3.25, 4.0]], times)
    assert windows == [(0.5, 2.5), (3.25, 4.0)]
    deltas = [{"dvc": 0.4}, {"flow": 1.0}, {"dvc": 0.2, "flow": 0.2}, {"server": 0.8}]
    during, outside = attribute(times, deltas, windows)
    assert during == pytest.approx({"dvc": 0.2 + 0.1, "flow": 1.0 + 0.1, "server": 0.6})
    assert outside == pytest.approx(0.2 + 0.0 + 0.2 + 0.2)
    assert sum(during.values()) + outside == pytest.approx(sum(sum(d.values()) for d in deltas))


def test_cpu_watch_splits_stage_commands_from_the_rest(tmp_path):
    """The pipeline row's CPU accounting: a stage command (and what it starts) counts as
    stage work, and its lifetime as stage time; the rest of the tree counts as
    orchestration, while a stage command is alive or not. CPU time is burned, not
    slept, so the figures do not depend on load."""
    import subprocess
    import sys

    from benchmarks.common import CpuWatch

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"
    (tmp_path / "worker.py").write_text(burn.format(s=1.0))
    (tmp_path / "stage.py").write_text(
        "import subprocess, sys\n"
        f"subprocess.run([sys.executable, {str(tmp_path / 'worker.py')!r}])\n" + burn.format(s=1.0)
    )
    word = "train"  # the stage's command line says `rcnnops train`, the parent's does not
    (tmp_path / "flow.py").write_text(
        "import subprocess, sys, threading, time\n"
        + burn.format(s=0.6)
        + "side = threading.Thread(target=lambda: exec("
        + repr(burn.format(s=0.5))
        + "))\n"
        f"stage = subprocess.Popen([sys.executable, {str(tmp_path / 'stage.py')!r}, 'rcnnops', "
        f"{word!r}])\n"
        "t = time.perf_counter(); side.start(); side.join(); stage.wait()\n"
        f"open({str(tmp_path / 'stage_seconds')!r}, 'w').write(str(time.perf_counter() - t))\n"
        + burn.format(s=0.6)
    )
    proc = subprocess.Popen([sys.executable, str(tmp_path / "flow.py")])
    watch = CpuWatch(proc.pid, interval=0.05)
    proc.wait()
    cpu = watch.stop()
    assert cpu["stage_commands"] == pytest.approx(2.0, abs=0.3)  # the stage and its worker
    assert cpu["rest_while_stages_ran"] == pytest.approx(0.5, abs=0.25)
    assert cpu["rest_otherwise"] == pytest.approx(1.2, abs=0.35)
    # from the stage's start to its end, as its parent saw it (which started timing just
    # after starting it and stopped just after reaping it), to within the sampling
    seen = float((tmp_path / "stage_seconds").read_text())
    assert cpu["stage_seconds"] == pytest.approx(seen, abs=0.1)
