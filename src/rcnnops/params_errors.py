"""Pydantic's validation errors in the words params.yaml's users read: the file,
then the dotted field as written in the file, then what was expected and what
was found (``params.yaml: train.faster_rcnn.lr: expected a number, got 'fast'``);
and the YAML it is read from, as DVC reads it, its errors naming the line.
"""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from rcnnops.config import ParamsError

_WORDS = {
    "int_type": "expected an integer",
    "float_type": "expected a number",
    "bool_type": "expected true/false",
    "finite_number": "expected a finite number",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _where(raw: Any, loc: tuple) -> tuple[str, Any]:
    """The dotted field of a pydantic error location, and the value found there.

    Union member tags in ``loc`` (``int``, ``literal['auto']``) are not keys of
    the input and are skipped; ``train.variants.X`` is written ``train.X``, as in
    the file."""
    parts, node = [], raw
    for i, part in enumerate(loc):
        in_dict = isinstance(node, dict) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and part < len(node)
        if in_dict or in_list:
            node = node[part]
        elif i < len(loc) - 1 or not isinstance(node, dict):
            continue  # a union tag
        if not (part == "variants" and parts == ["train"]):
            parts.append(f"[{part}]" if isinstance(part, int) else str(part))
    return ".".join(parts).replace(".[", "["), node


def did_you_mean(unknown: list[str], allowed: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the unknown names close to an allowed one."""
    import difflib

    close = [m for k in unknown for m in difflib.get_close_matches(k, allowed, n=1)]
    return f" (did you mean {', '.join(map(repr, close))}?)" if close else ""


def message(raw: dict, errors: list[dict], src: str, root: type[BaseModel]) -> str:
    """Today's wording for pydantic's first error (file and dotted field first)."""
    err = errors[0]
    kind, loc = err["type"], tuple(err["loc"])
    if kind == "extra_forbidden":
        parent, node = _where(raw, loc[:-1])
        unknown = sorted(str(e["loc"][-1]) for e in errors if e["type"] == kind)
        allowed = sorted(set(node) - set(unknown)) if isinstance(node, dict) else []
        model = _model_at(root, loc[:-1])
        allowed = sorted(model.model_fields) if model is not None else allowed
        what = f"{parent}: unknown key(s)" if parent else "unknown section(s)"
        return f"{src}: {what} {unknown}{did_you_mean(unknown, allowed)}; allowed: {allowed}"
    field, value = _where(raw, loc)
    # A union (``bool | Literal[...]``) fails once per member: name the choices.
    same = [e for e in errors if _where(raw, tuple(e["loc"]))[0] == field]
    literal = next((e for e in same if e["type"] == "literal_error"), None)
    if literal is not None:
        err, kind = literal, "literal_error"
    ctx = err.get("ctx") or {}
    if kind == "literal_error":
        also = "true/false or " if any(e["type"] == "bool_type" for e in same) else ""
        why = f"expected {also}one of {ctx.get('expected')}"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<"}.get(kind, "<=")
        why = f"must be {op} {next(iter(ctx.values()))}"
    else:
        why = _WORDS.get(kind, err["msg"])
    return f"{src}: {field}: {why}, got {_short(value)}"


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The params model at a location (for the list of allowed keys); a
    ``dict[str, Model]`` field consumes the key that follows it."""
    model: Any = root
    parts = list(loc)
    while parts:
        field = model.model_fields.get(parts.pop(0)) if _is_model(model) else None
        if field is None:
            return None
        args = typing.get_args(field.annotation) or (field.annotation,)
        if typing.get_origin(field.annotation) is dict:
            model = args[1]
            if parts:
                parts.pop(0)  # the key, e.g. the variant's name
        else:
            model = next((a for a in args if _is_model(a)), None)
    return model if _is_model(model) else None


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def read_yaml(text: str, where: str) -> Any:
    """YAML as DVC reads ``params.yaml`` (ruamel's safe loader, YAML 1.2: ``1e-3``
    is a number and ``on`` a string, where PyYAML's YAML 1.1 read a string and a
    boolean), so rcnnops uses the values DVC tracks. A syntax error or a
    duplicate key (DVC refuses those too) is a :class:`ParamsError` naming
    ``where`` and the line."""
    from ruamel.yaml import YAML, YAMLError

    try:
        return YAML(typ="safe").load(text)
    except YAMLError as e:
        raise yaml_error(e, text, where) from None


def yaml_error(e: Exception, text: str, where: str) -> ParamsError:
    """A ruamel YAML error as one line naming ``where``, the line and the problem."""
    from rcnnops.config import ParamsError

    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
    if mark is None:
        return ParamsError(f"{where}: not valid YAML: {problem}")
    lines = text.splitlines()
    line = lines[mark.line] if mark.line < len(lines) else ""
    tabs = " (YAML indents with spaces, not tabs)" if "\t" in line else ""
    return ParamsError(f"{where}: line {mark.line + 1}: not valid YAML: {problem}{tabs}")
