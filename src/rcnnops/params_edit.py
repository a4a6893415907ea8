"""Editing ``params.yaml`` in place, as ``dvc exp run -S`` does, keeping its comments.

DVC then sees ordinary params: a changed key reruns exactly the stages that
depend on it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from rcnnops.config import Params, ParamsError, parse_params, read_yaml, yaml_error
from rcnnops.files import write_atomic


def _null(representer: Any, _value: None) -> Any:
    return representer.represent_scalar("tag:yaml.org,2002:null", "null")


def _node(value: Any) -> Any:
    """``value`` as ruamel nodes: lists in flow style (``[6, 8]``, as params.yaml
    writes them; a block list after a key's end-of-line comment is not valid YAML)."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(value, list):
        seq = CommentedSeq([_node(v) for v in value])
        seq.fa.set_flow_style()
        return seq
    if isinstance(value, dict):
        return CommentedMap((k, _node(v)) for k, v in value.items())
    return value


def _assign(node: Any, keys: list[str], value: Any, where: str) -> int:
    """Set ``keys`` (``*`` matches every key of a mapping) under ``node``; count the hits."""
    if not isinstance(node, dict):
        raise ParamsError(f"{where}: not a mapping")
    head, rest = keys[0], keys[1:]
    targets = [k for k in node if isinstance(node[k], dict)] if head == "*" else [head]
    hits = 0
    for k in targets:
        if not rest:
            node[k] = _node(value)  # a fresh node each time: no YAML aliases
            hits += 1
        else:
            if k not in node:
                node[k] = {}
            hits += _assign(node[k], rest, value, f"{where}.{k}")
    return hits


def set_params(path: str | Path, assignments: dict[str, Any]) -> Params:
    """Edit ``params.yaml`` in place; returns the validated params.

    ``assignments`` maps dotted keys (``train.faster_rcnn.epochs``; ``*`` for
    every key at one level, e.g. ``train.*.epochs``) to values. The edited file
    is validated first; if it is invalid, nothing is written.
    """
    from ruamel.yaml import YAML, YAMLError

    path = Path(path)
    rt = YAML()
    rt.preserve_quotes = True
    rt.representer.add_representer(type(None), _null)  # `null` stays `null`, not blank
    try:
        text = path.read_text()
        doc = rt.load(text)
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found (run from the project folder)") from None
    except YAMLError as e:
        raise yaml_error(e, text, str(path)) from None
    for key, value in assignments.items():
        if not key or any(not part for part in key.split(".")):
            raise ParamsError(f"{path}: invalid key {key!r} (use dotted names: a.b.c)")
        if _assign(doc, key.split("."), value, str(path)) == 0:
            raise ParamsError(f"{path}: {key}: no such keys to set")
    buf = io.StringIO()
    rt.dump(doc, buf)
    params = parse_params(read_yaml(buf.getvalue(), str(path)), str(path))
    write_atomic(path, buf.getvalue())
    return params
