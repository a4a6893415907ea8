"""The registry's check of a model as served, run by the evaluate stage.

Before a version is registered, MLflow's check (:func:`mlflow.pyfunc.log_model`
runs it) saves the model as :mod:`rcnnops.pyfunc`, loads it as a server would and
makes it predict its input example. The evaluate stage runs that check here, where
the model's modules (torch) are loaded anyway, and records what it checked
(``serving_check.json``: the bundle's files, the package's code, the pinned
packages). Registering that very bundle with the same code and packages then skips
MLflow's repeat of the check (:func:`rcnnops.pyfunc.log` with ``checked=True``), so
the flow's process never loads the model.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from rcnnops.files import sha256_file, write_atomic
from rcnnops.pyfunc import (
    ENTRY,
    ServingCheckError,
    arguments,
    input_example,
    no_progress_bars,
    no_requirement_scan,
    requirements,
)

BUNDLE_FILES = ("model.pt", "model.json", "serving.json")
CHECK_FILE = "serving_check.json"  # the evaluate stage's record of its check


def serving_settings(params: Any, variant: str) -> dict:
    """How the served model runs, as evaluation did (``serving.json``): the
    selective-search settings for the variants that take precomputed proposals,
    and ``evaluate.svd_rank``."""
    from rcnnops.config import USES_PROPOSALS

    proposals = None
    if variant in USES_PROPOSALS:
        from rcnnops.proposals.store import settings_from

        proposals = settings_from(params).as_dict()
    return {"proposals": proposals, "svd_rank": params.evaluate.svd_rank}


def write_bundle(model_dir: Path, dest: Path, serving: dict) -> Path:
    """The weights bundle the pyfunc loads (``dest``, made here): model.pt and
    model.json from ``model_dir``, and ``serving`` as serving.json."""
    dest.mkdir()
    for f in ("model.pt", "model.json"):
        shutil.copy2(Path(model_dir) / f, dest / f)
    (dest / "serving.json").write_text(json.dumps(serving, indent=2))
    return dest


def _code_files() -> list[str]:
    """The package's source files this process has loaded (paths relative to the
    package), a superset of what the served model ran in :func:`check`, and the
    model-from-code file MLflow runs by its path."""
    package = Path(__file__).parent
    found = {ENTRY.relative_to(package).as_posix()}
    for name, module in list(sys.modules.items()):
        origin = getattr(module, "__file__", None)
        if (name == "rcnnops" or name.startswith("rcnnops.")) and origin:
            path = Path(origin)
            if path.suffix == ".py" and path.is_relative_to(package):
                found.add(path.relative_to(package).as_posix())
    return sorted(found)


def fingerprint(bundle: Path, code: list[str]) -> dict:
    """What a check's outcome depends on: the bundle's files, the package's ``code``
    files (as they are now here; a missing one is recorded as None), the model's
    pinned requirements (the installed versions) and MLflow's version."""
    package = Path(__file__).parent
    return {
        "bundle": {f: sha256_file(Path(bundle) / f) for f in BUNDLE_FILES},
        "code": {f: sha256_file(package / f) if (package / f).is_file() else None for f in code},
        "requirements": requirements(),
        "mlflow": mlflow.__version__,
    }


def check(bundle: Path, record: Path) -> None:
    """Check ``bundle`` as the registry would when it logs it: saved as this pyfunc
    (as :func:`rcnnops.pyfunc.log` saves it), loaded as served and made to predict its input
    example sent as a server receives it (MLflow's own check, which
    :func:`mlflow.pyfunc.log_model` runs). The evaluate stage runs this where the
    model's modules are loaded anyway; on success, ``record`` (a JSON file) holds
    the :func:`fingerprint` of what was checked, so that registering this bundle
    with the same code and packages skips the check (:func:`rcnnops.pyfunc.log`). Raises
    :class:`ServingCheckError` with MLflow's error, ``record`` removed."""
    from mlflow.models import convert_input_example_to_serving_input, validate_serving_input

    Path(record).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp, no_progress_bars(), no_requirement_scan():
        saved = Path(tmp) / "model"
        mlflow.pyfunc.save_model(str(saved), **arguments(bundle))
        serving_input = convert_input_example_to_serving_input(input_example())
        try:
            with warnings.catch_warnings():  # deprecated for users, in favour of a
                warnings.simplefilter("ignore")  # check in a new environment: the same code
                validate_serving_input(str(saved), serving_input)
        except Exception as e:  # noqa: BLE001 - whatever the served model raises
            raise ServingCheckError(f"{type(e).__name__}: {e}") from None
    write_atomic(Path(record), json.dumps(fingerprint(bundle, _code_files()), indent=2))


def checked(bundle: Path, record: Path) -> bool:
    """Whether ``record`` (:func:`check`'s) says this very bundle passed the check
    with the package's code and the packages as they are here now."""
    try:
        done = json.loads(Path(record).read_text())
        code = list(done["code"])
    except (OSError, ValueError, KeyError, TypeError):  # none, or not one of ours
        return False
    return done == fingerprint(bundle, code)
