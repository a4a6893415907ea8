"""DVC's YAML read and written quicker in the DVC launcher (rcnnops.dvc_yaml), with
the results DVC's own functions give: the same parses, the same bytes written."""

from __future__ import annotations

import io
import random
import subprocess
import sys
from collections import OrderedDict

import pytest

from rcnnops import dvc_yaml

yaml = pytest.importorskip("yaml")
if not hasattr(yaml, "CSafeDumper"):
    pytest.skip("PyYAML without libyaml: the quick writer is not used", allow_module_level=True)

MD5 = "0123456789abcdef0123456789abcdef"
LOCK = {  # the shape of a dvc.lock (DVC 3), with the values rcnnops' hold
    "schema": "2.0",
    "stages": {
        "train@faster_rcnn": {
            "cmd": "rcnnops train --variant faster_rcnn",
            "deps": [
                {"path": "src/rcnnops/proposals/selective_search.py", "hash": "md5",
                 "md5": MD5, "size": 12345},
                {"path": "data/prepared", "hash": "md5", "md5": MD5 + ".dir",
                 "size": 987654, "nfiles": 3},
            ],
            "params": {"params.yaml": {
                "train.faster_rcnn": {"lr": 0.02, "weight_decay": 0.0001, "pretrained": None,
                                      "anchor_sizes": [[32], [64, 128]], "amp": False,
                                      "lr_steps": [], "device": "auto", "epochs": 9},
                "seed": 0,
            }},
            "outs": [{"path": "models/faster_rcnn/model.pt", "hash": "md5", "md5": MD5,
                      "size": 12875653}],
        },
    },
}  # fmt: skip
# Values YAML 1.1 (libyaml's dumper) and 1.2 (ruamel.yaml's) read differently, that
# need quoting or escaping, or that are folded at 80 columns
AWKWARD = [
    "2.0", "007", "yes", "on", "No", "OFF", "y", "null", "~", "", " lead", "trail ", "a: b",
    "#c", "- x", "1e-05", "0x1F", "0o17", "1_000", "0777", "1:20", "true", "True", "@at",
    "'q'", '"dq"', "multi\nline", "tab\tx", "x #y", "2026-12-04", ".inf", "-.INF", ".nan",
    "=", "<<", "-", "a\\b", "ü", "é/x", "%p", "!bang", "*star", "&amp", "{b}", "[s]", "a,b",
    "?q", "|", ">", "x:", "abc", MD5, "src/rcnnops/data/io.py", "rcnnops train --variant rcnn",
    *("a" * n for n in (30, 45, 50, 55, 60, 65, 70, 75)),
    *(("ab " * 30)[:n].strip() for n in (40, 50, 58, 62, 66, 70, 76)),
]  # fmt: skip
NUMBERS = [0, 1, -1, 10**20, 0.1, 1e-05, 1.5, 3.0, 1 / 3, 1e16, True, False, None]


def _ruamel(data) -> str:
    """What DVC's own dumper writes."""
    from dvc.utils.serialize._yaml import _dump

    stream = io.StringIO()
    _dump(data, stream)
    return stream.getvalue()


def _alone(code: str) -> str:
    """Run ``code`` in a Python process of its own (as the launcher is: DVC's
    functions replaced for the whole process); its output, once it succeeded."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _random(rng: random.Random, depth: int = 0):
    pick = rng.random()
    if depth < 6 and pick < 0.3:
        keys = AWKWARD + ["path", "md5", "outs"]
        kind = OrderedDict if rng.random() < 0.3 else dict
        return kind((rng.choice(keys), _random(rng, depth + 1)) for _ in range(rng.randint(0, 4)))
    if depth < 6 and pick < 0.5:
        return [_random(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return rng.choice(AWKWARD + NUMBERS)


def test_dvc_lock_is_written_by_the_quick_path_byte_for_byte():
    quick = dvc_yaml._quick_dumper()
    # as DVC updates it: the file's parse, each stage's entry an OrderedDict
    lock = {"schema": LOCK["schema"], "stages": {}}
    for name, entry in LOCK["stages"].items():
        lock["stages"][name] = OrderedDict(entry)
    for data in (LOCK, lock):
        assert dvc_yaml.same_as_ruamel(data)  # rcnnops' own lock files take the quick path
        assert quick(data) == _ruamel(data)


def test_the_quick_path_takes_only_what_it_writes_as_ruamel_yaml_does():
    """Random documents of awkward keys and values: whatever the check lets through
    is written byte for byte as DVC's dumper writes it; much of it is let through,
    and none of the values that need care on their own."""
    quick, rng, taken = dvc_yaml._quick_dumper(), random.Random(17), 0
    for _ in range(4000):
        data = {"stages": _random(rng)}
        if dvc_yaml.same_as_ruamel(data):
            taken += 1
            assert quick(data) == _ruamel(data), data
    assert taken > 1000
    for value in ("yes", "on", "1e-05", "'q'", "multi\nline", "ü", " lead", "a" * 75, 1e-05):
        assert not dvc_yaml.same_as_ruamel({"key": value}), value
    assert not dvc_yaml.same_as_ruamel({"key": [None]})  # ruamel.yaml writes "- "
    assert not dvc_yaml.same_as_ruamel([1, 2]) and not dvc_yaml.same_as_ruamel("x")


def test_dvc_s_dumper_takes_the_quick_path_for_plain_data_only():
    """In a process of its own, as in the launcher: DVC's dump function writes plain
    data as before (through libyaml), and a round-trip document (dvc.yaml's edits,
    comments kept) through ruamel.yaml as before."""
    code = (
        "import io\n"
        "from dvc.utils.serialize import _yaml\n"
        "from rcnnops.dvc_yaml import quicker\n"
        "before = _yaml._dump\n"
        "def written(dump, data):\n"
        "    s = io.StringIO(); dump(data, s); return s.getvalue()\n"
        "plain = {'schema': '2.0', 'stages': {'a': {'cmd': 'x', 'p': None, 'l': [1, 0.5]}}}\n"
        "text = 'stages:  # mine\\n  a:\\n    cmd: x   # keep\\n'\n"
        "kept = _yaml.parse_yaml_for_update(text, 'dvc.yaml')\n"
        "expected = written(before, plain), written(before, kept)\n"
        "assert quicker() and _yaml._dump is not before\n"
        "assert (written(_yaml._dump, plain), written(_yaml._dump, kept)) == expected\n"
        "assert '# keep' in expected[1]\n"
    )
    _alone(code)


def test_a_text_is_parsed_once_and_each_caller_gets_a_copy():
    """In a process of its own, as in the launcher: DVC's parser (every name it is
    called by) parses a text once; each caller gets its own copy; dvc.lock's
    update parse is the safe one, other files keep their round-trip parse."""
    code = (
        "from rcnnops.dvc_yaml import quicker\n"
        "from dvc.utils import serialize, strictyaml\n"
        "from dvc.utils.serialize import _yaml\n"
        "calls = []\n"
        "real = _yaml.parse_yaml\n"
        "_yaml.parse_yaml = serialize.parse_yaml = strictyaml.parse_yaml = (\n"
        "    lambda *a, **k: calls.append(a[2:] or k) or real(*a, **k))\n"
        "assert quicker()\n"
        "assert _yaml.parse_yaml is serialize.parse_yaml is strictyaml.parse_yaml\n"
        "text = 'stages:\\n  a:\\n    outs: [x]\\n'\n"
        "one, two = strictyaml.parse_yaml(text, 'dvc.lock'), serialize.parse_yaml(text, 'p')\n"
        "assert one == two == {'stages': {'a': {'outs': ['x']}}} and one is not two\n"
        "one['stages'].clear()\n"
        "assert _yaml.parse_yaml(text, 'p') == two\n"
        "assert type(_yaml.parse_yaml_for_update(text, '/x/dvc.lock')) is dict\n"
        "assert type(_yaml.parse_yaml_for_update(text, '/x/dvc.yaml')) is not dict\n"
        "print(len(calls))\n"
    )
    assert _alone(code).strip() == "2"  # one safe parse, one round-trip parse (dvc.yaml)
