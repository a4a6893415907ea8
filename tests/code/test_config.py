import re
import shutil

import pytest
import yaml

from rcnnops.config import ParamsError, load_params, parse_params, stable_hash
from tests.conftest import REPO


def test_repo_params_parse():
    p = load_params(REPO / "params.yaml")
    assert p.variants == ["rcnn", "fast_rcnn", "faster_rcnn", "mask_rcnn"]
    assert p.variant("mask_rcnn").model["mask_roi_size"] == 14
    assert p.register.metric_for("mask_rcnn") == "segm_AP"
    assert p.register.metric_for("faster_rcnn") == "bbox_AP"
    assert p.variant("rcnn").model["classifier"] == "softmax"
    assert p.variant("faster_rcnn").model["backbone"] == "small"
    assert p.evaluate.backend == "pycocotools"


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"train": {"faster_rcnn": {"lr": "fast"}}}, "train.faster_rcnn.lr"),
        ({"train": {"faster_rcnn": {"epochs": 0}}}, "train.faster_rcnn.epochs"),
        ({"generate": {"colour": 1}}, "generate: unknown key"),
        (
            {"evaluat": 2},
            "params.yaml: unknown section(s) ['evaluat'] (did you mean 'evaluate'?); allowed: [",
        ),
        ({"variants": ["yolo"]}, "unknown variant 'yolo'"),
        ({"train": {"device": "tpu"}}, "train.device"),
        ({"prepare": {"val_fraction": 1.5}}, "prepare.val_fraction"),
        ({"evaluate": {"backend": "detectron2"}}, "evaluate.backend: expected one of"),
        # values that used to pass validation and then fail late or lie (issue 21)
        ({"register": {"min_improvement": -0.01}}, "register.min_improvement: must be >= 0"),
        ({"register": {"min_improvement": float("nan")}}, "register.min_improvement"),
        ({"register": {"metric": "bbox_ap"}}, "register.metric: 'bbox_ap' is not a metric"),
        ({"register": {"metric": "infer_ms_per_image"}}, "register.metric: 'infer_ms_per_image'"),
        (
            {"register": {"variant_metric": {"faster_rcnn": "segm_AP"}}},
            "register.variant_metric.faster_rcnn: 'segm_AP' is not a metric evaluate reports",
        ),
        ({"register": {"variant_metric": {"yolo": "bbox_AP"}}}, "unknown variant 'yolo'"),
        ({"train": {"eval_every": 0}}, "train.eval_every: must be > 0"),
        ({"train": {"log_every": 0}}, "train.log_every: must be > 0"),
        ({"evaluate": {"batch_size": 0}}, "evaluate.batch_size: must be > 0"),
        ({"train": {"faster_rcnn": {"lr": float("nan")}}}, "train.faster_rcnn.lr"),
        ({"train": {"faster_rcnn": {"lr": float("inf")}}}, "train.faster_rcnn.lr"),
        ({"train": {"faster_rcnn": {"momentum": -0.9}}}, "train.faster_rcnn.momentum"),
        ({"train": {"faster_rcnn": {"gamma": -0.1}}}, "train.faster_rcnn.gamma: must be > 0"),
        ({"train": {"faster_rcnn": {"clip_grad_norm": -1.0}}}, "train.faster_rcnn.clip_grad_norm"),
        ({"train": {"faster_rcnn": {"weight_decay": -1e-4}}}, "train.faster_rcnn.weight_decay"),
        (
            {"train": {"faster_rcnn": {"model": {"min_size": 0}}}},
            "train.faster_rcnn.model.min_size: must be a positive integer",
        ),
        # values that passed params and failed in the stage, or misled (found in review)
        (
            {"train": {"faster_rcnn": {"model": {"backbon": "small"}}}},
            "train.faster_rcnn.model: unknown key(s) ['backbon'] (did you mean 'backbone'?)",
        ),
        (
            {"train": {"mask_rcnn": {"model": {"mask_head_layers": 0}}}},
            "train.mask_rcnn.model.mask_head_layers: must be a positive integer, got 0",
        ),
        (
            {"train": {"faster_rcnn": {"model": {"min_size": []}}}},
            "train.faster_rcnn.model.min_size: must be a positive integer (or a non-empty",
        ),
        (
            {"train": {"faster_rcnn": {"model": {"max_size": True}}}},
            "train.faster_rcnn.model.max_size: must be a positive integer",
        ),
        (
            {"train": {"faster_rcnn": {"model": {"box_batch_size_per_image": 0}}}},
            "train.faster_rcnn.model.box_batch_size_per_image: must be a positive integer",
        ),
        ({"generate": {"max_objects": -3}}, "generate.max_objects: must be >= 0"),
        ({"generate": {"seed": -1}}, "generate.seed: must be >= 0"),
        ({"proposals": {"dedup_iou": -1.0}}, "proposals.dedup_iou: must be > 0"),
        ({"proposals": {"dedup_iou": 7.0}}, "proposals.dedup_iou: must be <= 1"),
        ({"proposals": {"min_size": -5}}, "proposals.min_size: must be >= 0"),
        ({"train": {"out": "/"}}, "train.out: an output folder inside the project"),
        ({"evaluate": {"out": "../elsewhere"}}, "evaluate.out: an output folder inside"),
        ({"prepare": {"out": "."}}, "prepare.out: an output folder inside"),
    ],
)
def test_bad_params_name_the_field(patch, field):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in patch.items():
        if isinstance(values, dict):
            for k, v in values.items():
                if isinstance(v, dict) and isinstance(raw[section].get(k), dict):
                    for kk, vv in v.items():  # one level deeper: train.V.model.key
                        if isinstance(vv, dict):
                            raw[section][k][kk].update(vv)
                        else:
                            raw[section][k][kk] = vv
                else:
                    raw[section][k] = v
        else:
            raw[section] = values
    with pytest.raises(ParamsError, match=re.escape(field)):
        parse_params(raw, "params.yaml")


def test_missing_params_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")


def test_stable_hash_ignores_key_order():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


def test_set_params_edits_in_place_keeping_comments(tmp_path):
    from rcnnops.params_edit import set_params

    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    p = set_params(path, {"train.*.epochs": 1, "train.faster_rcnn.lr": 0.005})
    assert all(vp.epochs == 1 for vp in p.train.variants.values())
    assert p.train.variants["faster_rcnn"].lr == 0.005
    text = path.read_text()
    assert "# Variants the pipeline trains" in text  # comments survive
    assert load_params(path) == p


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ({"train.faster_rcnn.epochs": 0}, r"train.faster_rcnn.epochs: must be > 0"),
        ({"train.faster_rcnn.lr": "fast"}, r"train.faster_rcnn.lr: expected a number"),
        ({"nosuch.*.x": 1}, "no such keys"),
        ({"data..root": "x"}, "invalid key"),
    ],
)
def test_set_params_refuses_invalid_values_and_writes_nothing(tmp_path, assignment, message):
    from rcnnops.params_edit import set_params

    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    before = path.read_text()
    with pytest.raises(ParamsError, match=message):
        set_params(path, assignment)
    assert path.read_text() == before


def test_find_coco_splits_reads_the_coco_layout(tmp_path):
    from rcnnops.data.io import DataError
    from rcnnops.data.prepare import find_coco_splits

    (tmp_path / "annotations").mkdir()
    with pytest.raises(DataError, match="no COCO annotations found"):
        find_coco_splits(tmp_path)
    for split in ("train2017", "val2017"):
        (tmp_path / "annotations" / f"instances_{split}.json").write_text("{}")
        (tmp_path / split).mkdir()
    got = find_coco_splits(tmp_path)
    assert got["train"] == {
        "annotations": "annotations/instances_train2017.json",
        "images": "train2017",
    }
    assert got["val"]["images"] == "val2017"
    (tmp_path / "annotations" / "instances_val2017.json").unlink()
    assert find_coco_splits(tmp_path)["val"] is None  # prepare splits one off


def test_params_read_as_dvc_reads_them(tmp_path):
    """YAML 1.2, as DVC (ruamel) reads params.yaml: ``1e-3`` is a number (PyYAML's
    YAML 1.1 read a string, so the most common way to write a learning rate was
    refused) and ``on`` a string (PyYAML read True); ``--set`` values the same."""
    from rcnnops.cli.common import assignments
    from rcnnops.params_edit import set_params

    path = tmp_path / "params.yaml"
    text = (REPO / "params.yaml").read_text()
    text = text.replace("    lr: 0.02\n", "    lr: 1e-3\n", 1)
    path.write_text(text.replace("experiment: rcnnops", "experiment: on", 1))
    p = load_params(path)
    assert 1e-3 in [v.lr for v in p.train.variants.values()]
    assert p.register.experiment == "on"
    given = assignments(
        epochs=0, sets=["train.faster_rcnn.weight_decay=5e-4", "register.experiment=off"]
    )
    assert given == {
        "train.*.epochs": 0,  # --epochs 0 is refused by the params, not dropped
        "train.faster_rcnn.weight_decay": 5e-4,
        "register.experiment": "off",
    }
    given.pop("train.*.epochs")
    p = set_params(path, given)
    assert (p.train.variants["faster_rcnn"].weight_decay, p.register.experiment) == (5e-4, "off")
    assert "    weight_decay: 0.0005\n" in path.read_text() and "null\n" in path.read_text()
    with pytest.raises(ParamsError, match=r"params.yaml: train.\w+.epochs: must be > 0, got 0"):
        set_params(path, assignments(epochs=0))


def test_editing_params_leaves_other_yaml_writers_alone(tmp_path):
    """params.yaml's editor writes None as ``null``; DVC's dumper, in the same
    process (the flow's), still writes it as DVC does: blank."""
    import io

    from dvc.utils.serialize._yaml import _dump

    from rcnnops.params_edit import set_params

    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    set_params(path, {"evaluate.svd_rank": None})
    assert "  svd_rank: null" in path.read_text()
    stream = io.StringIO()
    _dump({"a": None, "b": {"c": None}}, stream)
    assert stream.getvalue() == "a:\nb:\n  c:\n"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.replace("generate:\n", "generate:\n  seed: 1\n  seed: 2\n", 1),
            r'params.yaml: line \d+: not valid YAML: found duplicate key "seed"',
        ),
        (
            lambda t: t.replace("generate:\n  ", "generate:\n\t", 1),
            r"params.yaml: line \d+: not valid YAML: .* \(YAML indents with spaces, not tabs\)",
        ),
        (
            lambda t: t + "x: [1\n",
            r"params.yaml: line \d+: not valid YAML: (did not find )?expected .,. or .\].",
        ),
    ],
    ids=["duplicate key", "tab", "unclosed list"],
)
def test_bad_yaml_is_one_line_with_its_line_on_every_path(tmp_path, edit, message):
    """A duplicate key was read as its last value by the stages (DVC refuses the
    file), and a YAML error met by ``--set`` was a ruamel traceback."""
    from rcnnops.params_edit import set_params

    path = tmp_path / "params.yaml"
    path.write_text(edit((REPO / "params.yaml").read_text()))
    before = path.read_text()
    with pytest.raises(ParamsError, match=message):
        load_params(path)
    with pytest.raises(ParamsError, match=message):
        set_params(path, {"generate.num_val": 4})
    assert path.read_text() == before
