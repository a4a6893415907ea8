import pytest
import yaml

from rcnnops.config import ParamsError, load_params, parse_params, stable_hash
from tests.conftest import REPO


def test_repo_params_parse():
    p = load_params(REPO / "params.yaml")
    assert p.variants == ["rcnn", "fast_rcnn", "faster_rcnn"]
    assert p.variant("rcnn").model["classifier"] == "softmax"
    assert p.variant("faster_rcnn").model["backbone"] == "small"


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"train": {"faster_rcnn": {"lr": "fast"}}}, "train.faster_rcnn.lr"),
        ({"train": {"faster_rcnn": {"epochs": 0}}}, "train.faster_rcnn.epochs"),
        ({"generate": {"colour": 1}}, "generate: unknown key"),
        ({"variants": ["yolo"]}, "unknown variant 'yolo'"),
        ({"train": {"device": "tpu"}}, "train.device"),
        ({"prepare": {"val_fraction": 1.5}}, "prepare.val_fraction"),
    ],
)
def test_bad_params_name_the_field(patch, field):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in patch.items():
        if isinstance(values, dict):
            for k, v in values.items():
                if isinstance(v, dict):
                    raw[section][k].update(v)
                else:
                    raw[section][k] = v
        else:
            raw[section] = values
    with pytest.raises(ParamsError, match=field.replace("[", r"\[").replace(".", r"\.")):
        parse_params(raw, "params.yaml")


def test_missing_params_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")


def test_stable_hash_ignores_key_order():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
