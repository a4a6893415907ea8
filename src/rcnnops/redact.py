"""One secret scrubber for everything that is logged or stored and can hold a URL.

URLs carry credentials in their user-info (``https://KEY:secret@host/``,
``postgresql://user:pw@db/mlflow``) or in query parameters (``?access_key=...``,
presigned ``X-Amz-Signature``); environment variables named like secrets hold
the rest. :func:`redact` removes all three from a string, so log lines, task
results, Prefect's database, ``.rcnnops/last_run.json`` and MLflow tags never
keep them.
"""

from __future__ import annotations

import os
import re

REDACTED = "<redacted>"
# Names of settings, variables and query parameters whose values are secrets.
SECRET_NAME = re.compile(
    r"(secret|token|password|passwd|api[_-]?key|access[_-]?key|private[_-]?key|credential"
    r"|signature|sig$)",
    re.I,
)
# scheme://user[:password]@ : the whole user-info goes (a user name can be a key id).
_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.\-]*://)(?P<info>[^/@\s?#]+)@", re.I)
_QUERY = re.compile(r"(?P<key>[?&;][^=&;#\s]+)=(?P<value>[^&;#\s]*)")


def _env_secrets() -> list[str]:
    """Values of secret-named environment variables (6 characters or more: shorter
    ones would redact ordinary words)."""
    return [v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 6]


def redact(text: str) -> str:
    """``text`` without URL credentials, secret query values or secret env values."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    text = _QUERY.sub(
        lambda m: f"{m['key']}={REDACTED}" if SECRET_NAME.search(m["key"]) else m[0], text
    )
    for secret in _env_secrets():
        text = text.replace(secret, REDACTED)
    return text
