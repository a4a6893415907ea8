"""The Dockerfile installs what pyproject.toml pins, as a non-root user, and runs
the flow by default (no Docker engine is needed to check it)."""

import re
import tomllib

from tests.conftest import REPO


def _pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {m[1].lower(): m[2] for d in deps if (m := re.match(r"([A-Za-z0-9_.-]+)==(\S+)", d))}


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())  # join continued lines
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def test_dockerfile_pins_match_pyproject():
    pins = _pins()
    assert {"torch", "torchvision"} <= set(pins)
    installs = " ".join(arg for op, arg in _instructions() if op == "RUN" and "pip install" in arg)
    found = {name.lower(): version for name, version in re.findall(r"([\w.-]+)==(\S+)", installs)}
    assert found, "the Dockerfile pins no package"
    for name, version in found.items():
        assert pins.get(name) == version, f"Dockerfile pins {name}=={version}, pyproject {pins}"
    assert {"torch", "torchvision"} <= set(found)  # the big layer is cached on its own
    assert re.search(r"pip install \.(\s|$)", installs), "the package itself is not installed"


def test_dockerfile_runs_the_flow_as_a_non_root_user():
    ops = _instructions()
    users = [arg for op, arg in ops if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ops[-1] == ("CMD", '["rcnnops", "run"]')
    assert [op for op, _ in ops].index("USER") < len(ops) - 1


def test_dockerfile_migrates_prefect_s_database_as_the_user_who_runs():
    """Every container starts from the image's home: Prefect's database is migrated at
    build time, in the home of the user the flow runs as, not by each run."""
    ops = _instructions()
    upgrade = [i for i, (op, arg) in enumerate(ops) if op == "RUN" and "database upgrade" in arg]
    assert upgrade, "the image does not migrate Prefect's database"
    user = max(i for i, (op, _) in enumerate(ops) if op == "USER")
    assert upgrade[0] > user
    assert "-y" in ops[upgrade[0]][1].split()  # no prompt at build time
