"""rcnnops.user: a uid with no name (no password-database entry, no USER or
LOGNAME: ``docker run -u 1234``, OpenShift) still runs the pipeline; DVC fails
outright without a name."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys

import pytest

from rcnnops.registry.store import actor_name
from rcnnops.user import name_the_user, user_name
from tests.conftest import NAME_VARIABLES


@pytest.fixture
def nameless(monkeypatch):
    """This process as a uid the system cannot name."""
    real = pwd.getpwuid

    def getpwuid(uid):
        if uid == os.getuid():
            raise KeyError(f"getpwuid(): uid not found: {uid}")
        return real(uid)

    monkeypatch.setattr(pwd, "getpwuid", getpwuid)
    for name in NAME_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_a_uid_without_a_name_is_named_after_its_number(nameless, monkeypatch):
    monkeypatch.delenv("RCNNOPS_ACTOR", raising=False)
    assert user_name() == f"uid{os.getuid()}"
    assert actor_name(None) == f"uid{os.getuid()}"  # the registry's audit trail
    name_the_user()
    assert os.environ["USER"] == f"uid{os.getuid()}"


def test_a_name_the_system_or_the_user_gives_is_kept(monkeypatch):
    monkeypatch.setenv("USER", "alice")
    monkeypatch.delenv("LOGNAME", raising=False)
    name_the_user()
    assert os.environ["USER"] == "alice" and user_name() == "alice"


def test_dvc_runs_for_a_nameless_uid_once_named(nameless_env, tmp_path):
    """DVC, a child process, inherits the name: without it, its first command fails."""
    subprocess.run(
        [sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True
    )
    status = [sys.executable, "-m", "dvc", "status"]
    bare = subprocess.run(status, cwd=tmp_path, env=nameless_env, capture_output=True, text=True)
    assert bare.returncode != 0 and "uid not found" in bare.stdout + bare.stderr  # the failure
    named = subprocess.run(
        [sys.executable, "-c", NAMED_CHILD, *status],
        cwd=tmp_path,
        env=nameless_env,
        capture_output=True,
        text=True,
    )
    assert named.returncode == 0, named.stdout + named.stderr


NAMED_CHILD = """
import subprocess, sys
from rcnnops.user import name_the_user
name_the_user()
sys.exit(subprocess.call(sys.argv[1:]))
"""
