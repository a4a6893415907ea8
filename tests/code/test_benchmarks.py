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
    md = markdown(_doc([ok, bad]))
    assert "| 8 | no-op rerun | 12.3 s | <= 10 s | **does not hold** |" in md
    assert "| no-op | 12.3 |" in md
    assert "- a note" in md
    assert "**failed:**" in md and "ValueError: boom" in md
    assert "no GPU (CPU)" in md and "quick mode" in md


def test_unknown_comparison_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--only", "nope"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown comparison(s) ['nope']" in err and "variants" in err
