"""Presets: named params that `run --preset` writes into params.yaml."""

from __future__ import annotations

import shutil

import pytest
import yaml

from rcnnops.config import ParamsError, load_params
from rcnnops.params_edit import set_params
from rcnnops.presets import PRESETS, assignments
from tests.conftest import REPO


def test_cpu_scratch_is_the_repository_params(tmp_path):
    """Applying cpu-scratch to the repository's params.yaml changes nothing: the
    preset is today's defaults, so it undoes any other preset."""
    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    before = load_params(path)
    assert set_params(path, assignments("cpu-scratch")) == before

    def comments(text: str) -> list[str]:  # every one kept, in place
        return [line.split("#", 1)[1] for line in text.splitlines() if "#" in line]

    assert comments(path.read_text()) == comments((REPO / "params.yaml").read_text())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_gives_valid_params_and_back(name, tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    p = set_params(path, assignments(name))
    for key, value in assignments(name).items():
        node = yaml.safe_load(path.read_text())
        for part in key.split("."):
            node = node[part]
        assert node == value, key
    from rcnnops.models import build_model

    for variant in p.variants:  # every model builder accepts the preset's arguments
        model_params = {k: v for k, v in p.variant(variant).model.items() if k != "pretrained"}
        assert build_model(variant, 3, model_params) is not None
    back = set_params(path, assignments("cpu-scratch"))
    assert back == load_params(REPO / "params.yaml")

    # the section headings survive both (one was lost: ruamel keeps it on the last
    # key of the mapping a preset replaces); a key's own comment goes with the key
    def headings(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("#")]

    assert headings(path.read_text()) == headings((REPO / "params.yaml").read_text())


def test_unknown_preset_is_named():
    with pytest.raises(ParamsError, match="no such preset; choose one of"):
        assignments("gpu-magic")


def test_presets_command_lists_them(capsys):
    from rcnnops.cli import main

    assert main(["-C", str(REPO), "presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS)
