"""DVC's YAML reading and writing made quicker, with the same results, in the DVC
launcher (:mod:`rcnnops.dvc_launcher`) before it forks its commands.

ruamel.yaml, which DVC uses, is pure Python where it matters here. A quick run's
eleven stages each read dvc.yaml, params.yaml and dvc.lock several times and
then rewrite dvc.lock (57 kB once it holds four variants) and write a run-cache
entry: 0.1-0.2 s of CPU apiece. :func:`quicker` replaces DVC's functions so that

- a text is parsed once per command, each caller getting a copy of that parse
  (safe parses only, what DVC reads; its round-trip parses, for edits, are not kept);
- dvc.lock is updated from a safe parse instead of a round-trip one (four times
  the cost): dvc.lock is DVC's own output, no comments, block style, and DVC's
  dumper writes the same bytes from either. A comment added to dvc.lock by hand
  is dropped at its next update;
- plain data (what dvc.lock and the run cache hold) is written by libyaml's C
  emitter when the text is certain to be the one ruamel.yaml would write, byte
  for byte (:func:`same_as_ruamel`), else by DVC's own dumper.

Where DVC's functions moved, nothing changes.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from collections import OrderedDict
from typing import Any

_PARSED_KEPT = 8  # texts whose parse a command keeps (dvc.yaml, dvc.lock, params.yaml...)

# Strings both emitters write alike: plain, or single-quoted when a resolver reads
# them as another type ('2.0'), both when the YAML 1.1 (libyaml's dumper) and 1.2
# (ruamel.yaml's) resolvers agree on it; no character that needs quoting, escaping
# or a choice of style; and on a line short enough never to be folded or moved.
_SIMPLE = re.compile(r"[A-Za-z0-9_./][A-Za-z0-9_./@+=,-]*(?: [A-Za-z0-9_./@+=,-]+)*")
_WIDTH = 76  # columns a line written by the quick path stays within (both fold at 80)
_STR = "tag:yaml.org,2002:str"


def quicker() -> bool:
    """Replace DVC's YAML parse and dump functions (see the module docstring) in
    this process; returns whether it did."""
    try:
        from dvc.utils import serialize, strictyaml
        from dvc.utils.serialize import _yaml
    except ImportError:
        return False
    parse = getattr(_yaml, "parse_yaml", None)
    for_update = getattr(_yaml, "parse_yaml_for_update", None)
    dump = getattr(_yaml, "_dump", None)
    if parse is None or for_update is None or dump is None:
        return False
    parsed: dict[str, object] = {}

    def parse_yaml(text, path, typ="safe"):
        if typ != "safe":
            return parse(text, path, typ)
        if text not in parsed:
            if len(parsed) >= _PARSED_KEPT:
                parsed.pop(next(iter(parsed)))
            parsed[text] = parse(text, path, typ)  # an error is raised, not kept
        return copy.deepcopy(parsed[text])

    def parse_yaml_for_update(text, path):
        if os.path.basename(str(path)) == "dvc.lock":
            return parse_yaml(text, path)
        return for_update(text, path)

    quick = _quick_dumper()

    def _dump(data, stream):
        if quick is not None and same_as_ruamel(data):
            return stream.write(quick(data))
        return dump(data, stream)

    for module in (_yaml, serialize, strictyaml):
        if getattr(module, "parse_yaml", None) is parse:
            module.parse_yaml = parse_yaml
    _yaml.parse_yaml_for_update = parse_yaml_for_update  # modify_yaml's, for dvc.lock
    _yaml._dump = _dump  # modify_yaml's and dump_yaml's (dvc.lock, the run cache)
    return True


def _quick_dumper():
    """``data -> text`` with libyaml's emitter in DVC's layout (block style, keys in
    order, null as nothing), or None without libyaml."""
    try:
        import yaml
    except ImportError:
        return None
    base = getattr(yaml, "CSafeDumper", None)
    if base is None:
        return None

    class Dumper(base):  # type: ignore[misc, valid-type]
        pass

    Dumper.add_representer(
        type(None), lambda d, _: d.represent_scalar("tag:yaml.org,2002:null", "")
    )
    Dumper.add_representer(OrderedDict, Dumper.represent_dict)  # DVC's lock entries

    def dump(data: Any) -> str:
        return yaml.dump(
            data, Dumper=Dumper, default_flow_style=False, sort_keys=False, allow_unicode=True
        )

    return dump


_resolvers: list = []


def _agree(text: str) -> bool:
    """Whether YAML 1.1 and 1.2 both read ``text``, written plain, as a string, or
    both as something else (then both quote it)."""
    if not _resolvers:
        import yaml
        from ruamel.yaml.nodes import ScalarNode
        from ruamel.yaml.resolver import VersionedResolver

        _resolvers.append((yaml.resolver.Resolver(), yaml.nodes.ScalarNode))
        _resolvers.append((VersionedResolver(version=(1, 2)), ScalarNode))
    read = {r.resolve(node, text, (True, False)) == _STR for r, node in _resolvers}
    return len(read) == 1


@functools.lru_cache(maxsize=4096)  # a lock repeats its keys and paths many times
def _simple(text: str) -> bool:
    return _SIMPLE.fullmatch(text) is not None and _agree(text)


def same_as_ruamel(data: Any) -> bool:
    """Whether libyaml's emitter writes ``data`` as DVC's ruamel.yaml dumper does:
    only dicts (or OrderedDicts) with :func:`_simple` string keys, lists, simple
    strings (or empty ones), ints, bools, floats written without an exponent, and None as a dict's
    value (in a list ruamel.yaml leaves a trailing space), every line within
    :data:`_WIDTH` columns (each level counted as 2 more, at most what it adds).
    Checked by the tests against ruamel.yaml on DVC's files and on awkward values."""
    if not isinstance(data, dict):  # (a lone scalar gets an end-of-document line)
        return False
    todo: list[tuple[Any, int, int, bool]] = [(data, 0, 0, False)]  # item, column, ...
    while todo:  # ... the column its text starts at when it is a scalar, in a dict
        item, column, start, in_dict = todo.pop()
        kind = type(item)
        if kind is dict or kind is OrderedDict:
            for key, value in item.items():
                if type(key) is not str or not _simple(key) or column + len(key) > _WIDTH:
                    return False
                todo.append((value, column + 2, column + len(key) + 2, True))
        elif kind is list:
            todo.extend((value, column + 2, column + 2, False) for value in item)
        elif item is None:
            if not in_dict:
                return False
        elif kind is str:
            if start + len(item) > _WIDTH or (item and not _simple(item)):
                return False
        elif kind is float:
            if start + 24 > _WIDTH or not re.fullmatch(r"-?[0-9]+\.[0-9]+", repr(item)):
                return False
        elif kind not in (int, bool) or start + len(repr(item)) > _WIDTH:
            return False
    return True
