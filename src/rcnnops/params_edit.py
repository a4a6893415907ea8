"""Editing ``params.yaml`` in place, as ``dvc exp run -S`` does, keeping its comments.

DVC then sees ordinary params: a changed key reruns exactly the stages that
depend on it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from rcnnops.config import Params, ParamsError, parse_params
from rcnnops.files import write_atomic
from rcnnops.params_errors import read_yaml, yaml_error


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


def _keep_comments(old: Any, new: Any) -> None:
    """Carry a replaced mapping's comments over to the mapping replacing it (a preset
    sets whole sections): each key's end-of-line comment stays with the key, and
    what followed the old mapping (ruamel keeps it on its last key: blank lines and
    the next section's heading) follows the new one. Without this, presets dropped
    the heading of the section after the one they set."""
    from ruamel.yaml.comments import CommentedMap
    from ruamel.yaml.tokens import CommentToken

    if not (isinstance(old, CommentedMap) and isinstance(new, CommentedMap) and old and new):
        return
    for k in new:
        if k in old:
            if k in old.ca.items:
                new.ca.items[k] = list(old.ca.items[k])
            _keep_comments(old[k], new[k])
    old_last, new_last = list(old)[-1], list(new)[-1]
    token = (old.ca.items.get(old_last) or [None] * 4)[2]
    if old_last == new_last or token is None or "\n" not in token.value.rstrip("\n"):
        return
    own, _, after = token.value.partition("\n")  # its end-of-line comment, then the rest
    if old_last in new:
        new.ca.items[old_last][2] = CommentToken(own + "\n", token.start_mark, None)
    slot = new.ca.items.setdefault(new_last, [None, None, None, None])
    if slot[2] is None:
        slot[2] = CommentToken("\n" + after, token.start_mark, None)
    else:
        slot[2] = CommentToken(slot[2].value + after, slot[2].start_mark, None)


def _assign(node: Any, keys: list[str], value: Any, where: str) -> int:
    """Set ``keys`` (``*`` matches every key of a mapping) under ``node``; count the hits."""
    if not isinstance(node, dict):
        raise ParamsError(f"{where}: not a mapping")
    head, rest = keys[0], keys[1:]
    targets = [k for k in node if isinstance(node[k], dict)] if head == "*" else [head]
    hits = 0
    for k in targets:
        if not rest:
            new = _node(value)  # a fresh node each time: no YAML aliases
            if k in node:
                _keep_comments(node[k], new)
            node[k] = new
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
    from ruamel.yaml.representer import RoundTripRepresenter

    class Representer(RoundTripRepresenter):  # this editor's only: add_representer
        pass  # changes the class, and ruamel.yaml's own is every dumper's (DVC's too)

    Representer.add_representer(type(None), _null)  # `null` stays `null`, not blank
    path = Path(path)
    rt = YAML()
    rt.preserve_quotes = True
    rt.Representer = Representer
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
