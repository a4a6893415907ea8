"""Who runs rcnnops: a name for the user, also for a uid the system cannot name.

``getpass.getuser()`` reads ``LOGNAME``, ``USER``, ``LNAME`` and ``USERNAME``,
then the password database. For a uid with no entry there and none of those
variables (``docker run -u 1234``, the arbitrary uids of OpenShift and of
Kubernetes' ``runAsUser``) it raises (``KeyError`` before Python 3.13,
``OSError`` since), and the tools rcnnops drives call it: DVC for every
repository it opens (so the pipeline's first ``dvc`` command fails with
"unexpected error - 'getpwuid(): uid not found'"), torch for its compile cache,
MLflow for a run's ``mlflow.user`` tag (dropped with a warning).
"""

from __future__ import annotations

import getpass
import os


def _unnamed() -> str:
    return f"uid{os.getuid()}" if hasattr(os, "getuid") else "unknown"


def user_name() -> str:
    """The user's login name, else ``uid<N>``."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return _unnamed()


def name_the_user() -> None:
    """When the system cannot name this process's uid, set ``USER=uid<N>`` in its
    environment, and so in its children's (DVC, the stage commands, Prefect's
    server); a name the system or the user gives is left alone. The ``rcnnops``
    command and the ``pipelines`` package call this."""
    try:
        getpass.getuser()
    except (KeyError, OSError):
        os.environ["USER"] = _unnamed()
