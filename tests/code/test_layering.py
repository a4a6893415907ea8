"""The package's layers: what imports what, and what is declared.

- ``src/rcnnops`` never imports ``pipelines`` (the orchestration sits above it);
- ``rcnnops models`` and the served model do not load the training engine;
- every third-party package the code imports is a declared dependency.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from tests.conftest import REPO

TRAINING = ("rcnnops.train", "rcnnops.engine", "rcnnops.solver", "rcnnops.checkpoints")


def _imports(root: Path) -> dict[str, set[Path]]:
    """Top-level module name -> files importing it (anywhere in the file)."""
    found: dict[str, set[Path]] = {}
    for path in root.rglob("*.py"):
        for n in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(n, ast.Import):
                names = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                names = [n.module]
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(path.relative_to(REPO))
    return found


def test_the_library_never_imports_the_orchestration():
    assert "pipelines" not in _imports(REPO / "src" / "rcnnops")


def test_every_third_party_import_is_declared():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {
        d.split(";")[0].split("[")[0].split("=")[0].split("<")[0].split(">")[0].strip().lower()
        for d in declared
    }
    names = {n.replace("_", "-") for n in names}
    dists = packages_distributions()
    used = _imports(REPO / "src") | _imports(REPO / "pipelines")
    ours = {"rcnnops", "pipelines", "__future__"}
    missing = {}
    for module, files in used.items():
        if module in sys.stdlib_module_names or module in ours:
            continue
        provided = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not provided & names:
            missing[module] = sorted(map(str, files))
    assert not missing, f"imported but not in pyproject.toml dependencies: {missing}"


PROBE = """
import json, sys
from pathlib import Path
import torch
from rcnnops.cli import main
assert main(["-C", sys.argv[1], "models", "--json"]) == 0
loaded = {"models": sorted(m for m in sys.modules if m.startswith("rcnnops."))}
from rcnnops.models import build_model
from rcnnops.models.io import save_model
from rcnnops.data.dataset import LabelMap
import rcnnops.pyfunc_model  # what MLflow imports to serve a registered version
from rcnnops.detect import Detector
labels = LabelMap((1,), ("thing",))
params = {"backbone": "small", "min_size": 64, "max_size": 64, "anchor_sizes": [16, 32],
          "representation_size": 32}
model = build_model("faster_rcnn", 2, params)
save_model(model, Path(sys.argv[1]) / "bundle", {"variant": "faster_rcnn", "num_classes": 2,
           "model_params": params, "labels": labels.to_json()})
detector = Detector.from_dir(Path(sys.argv[1]) / "bundle")
import numpy as np
detector([np.zeros((64, 64, 3), np.uint8)])
loaded["served"] = sorted(m for m in sys.modules if m.startswith("rcnnops."))
print(json.dumps(loaded))
"""


def test_listing_and_serving_do_not_load_the_training_engine(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    ).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    for what in ("models", "served"):
        assert not set(TRAINING) & set(loaded[what]), (what, loaded[what])
    assert "rcnnops.models.io" in loaded["served"]  # the probe did load a model
