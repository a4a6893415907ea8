"""dvc.yaml's source dependencies are exactly what each stage's command imports.

A stage whose ``deps`` miss a module its command imports stays "up to date" after
that module changes, with a stale model: DVC can only trust what it is told. The
test walks the imports (top-level and inside functions) from the handler of the
stage's command in ``rcnnops/cli/stages.py`` through every module of the package,
and compares the files with the stage's ``src/`` deps.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

SRC = REPO / "src"
PACKAGE = "rcnnops"


def _module_file(name: str) -> Path | None:
    """The file of module ``name`` (``a.b`` -> a/b.py or a/b/__init__.py), if ours."""
    base = SRC.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported(node: ast.AST) -> set[str]:
    """Modules of the package imported anywhere under ``node`` (also in functions)."""
    found: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Import):
            found |= {a.name for a in n.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(n, ast.ImportFrom) and n.module and n.module.split(".")[0] == PACKAGE:
            found.add(n.module)
            # `from rcnnops.data import prepare` imports a submodule
            found |= {
                f"{n.module}.{a.name}" for a in n.names if _module_file(f"{n.module}.{a.name}")
            }
    return found


# Files a module runs by their path, not by an import: MLflow runs the pyfunc's
# "model from code" file when rcnnops.pyfunc saves and loads the model.
RUNS_BY_PATH = {"rcnnops.pyfunc": {"rcnnops.pyfunc_model"}}


def _with_parents(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def closure(modules: set[str]) -> set[Path]:
    """Every file of the package that importing ``modules`` executes."""
    todo, files, seen = set(modules), set(), set()
    while todo:
        name = todo.pop()
        for mod in _with_parents(name):
            if mod in seen:
                continue
            seen.add(mod)
            path = _module_file(mod)
            if path is None:
                continue
            files.add(path.relative_to(REPO))
            todo |= _imported(ast.parse(path.read_text())) | RUNS_BY_PATH.get(mod, set())
    return files


def handler_imports(command: str) -> set[str]:
    """What the stage command's handler imports (its entry modules)."""
    tree = ast.parse((SRC / PACKAGE / "cli" / "stages.py").read_text())
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef) and fn.name == f"cmd_{command}":
            return _imported(fn)
    raise AssertionError(f"no handler cmd_{command} in rcnnops/cli/stages.py")


def _substitute(text: str, params: dict, key: str | None, item: dict) -> str:
    def lookup(expr: str):
        if expr == "key":
            return key
        node = item if expr.startswith("item.") else params
        for part in expr.removeprefix("item.").split("."):
            node = node[part]
        return node

    while "${" in text:
        start = text.index("${")
        end = text.index("}", start)
        text = text[:start] + str(lookup(text[start + 2 : end])) + text[end + 1 :]
    return text


def stages() -> list[tuple[str, str, set[Path]]]:
    """(stage name, command, src/ deps) for every stage, foreach expanded."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    out = []
    for name, stage in dvc["stages"].items():
        items = stage["foreach"].items() if "foreach" in stage else [(None, {})]
        body = stage.get("do", stage)
        for key, item in items:
            deps = {_substitute(d, params, key, item) for d in body.get("deps", [])}
            command = _substitute(body["cmd"], params, key, item).split()[1]
            src = {Path(d) for d in deps if d.startswith("src/")}
            out.append((name if key is None else f"{name}@{key}", command, src))
    return out


def variant_files(variant: str) -> set[Path]:
    """What building ``variant`` imports beyond its stage's handler: its own module
    and the ones it builds on (``rcnnops.models`` imports it on first use)."""
    from rcnnops.models import VARIANT_MODULES

    return closure({VARIANT_MODULES[variant]})


@pytest.mark.parametrize(("stage", "command", "deps"), stages(), ids=[s[0] for s in stages()])
def test_stage_deps_are_what_its_command_imports(stage, command, deps):
    needed = closure(handler_imports(command))
    if "@" in stage:  # train@<variant>, evaluate@<variant>: the variant's modules too
        needed |= variant_files(stage.split("@")[1])
    missing, extra = sorted(map(str, needed - deps)), sorted(map(str, deps - needed))
    assert not missing, f"dvc.yaml stage {stage}: deps miss {missing}"
    assert not extra, f"dvc.yaml stage {stage}: deps list {extra}, which it does not import"


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_a_variant_stage_imports_no_other_variant(command):
    """No module a train/evaluate command loads for every variant imports a
    variant's module: so editing one variant reruns only the stages of the
    variants built on it (R-CNN on Fast R-CNN, Mask R-CNN on Faster R-CNN)."""
    from rcnnops.models import VARIANT_MODULES

    variants = {_module_file(m).relative_to(REPO) for m in VARIANT_MODULES.values()}
    assert closure(handler_imports(command)) & variants == set()
    own = {v: variant_files(v) & variants for v in VARIANT_MODULES}
    models = Path("src/rcnnops/models")
    assert own == {
        "rcnn": {models / "rcnn.py", models / "fast_rcnn.py"},
        "fast_rcnn": {models / "fast_rcnn.py"},
        "faster_rcnn": {models / "faster_rcnn.py"},
        "mask_rcnn": {models / "mask_rcnn.py", models / "faster_rcnn.py"},
    }


def test_the_walk_sees_lazy_imports_and_packages():
    files = closure({"rcnnops.evaluate"})
    assert Path("src/rcnnops/models/io.py") in files  # imported inside run()
    assert Path("src/rcnnops/models/__init__.py") in files  # parent package of models.io
    assert Path("src/rcnnops/engine.py") not in files  # evaluation never trains


if __name__ == "__main__":  # print each stage command's deps, to paste into dvc.yaml
    for cmd in ("generate", "prepare", "proposals", "train", "evaluate"):
        print(f"{cmd}:")
        for path in sorted(map(str, closure(handler_imports(cmd)))):
            print(f"  - {path}")
    from rcnnops.models import VARIANT_MODULES

    for variant in VARIANT_MODULES:  # train@ and evaluate@ add these
        print(f"{variant}: {sorted(map(str, variant_files(variant)))}")
