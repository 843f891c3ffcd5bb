"""Credentials in URLs, hidden wherever a run writes or prints what it was given: the log, config.yaml, lock files,
the tuned config's header, trackers' copies of the config and the export. `user:PASSWORD@host` becomes
`user:***@host`, and a query parameter that carries a secret (password=, token=, ...) keeps its name only. The
libraries (MLflow, Optuna's storage) still get the original string from the config or the command line."""
from __future__ import annotations

import re
from typing import Any

MASK = "***"
# scheme://user:password@ -- the password runs to the first '@' (a password holding '@' must be percent-encoded).
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@?#]*):[^@\s]*?@")
_SECRET_PARAMETER = re.compile(r"(?P<head>[?&;](?:password|passwd|pwd|token|secret|api_key|apikey|access_key|"
                               r"secret_key|auth)=)[^&;#\s]*", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with every URL's password (and secret query parameters) replaced by ***."""
    text = _USERINFO.sub(lambda match: f"{match['head']}:{MASK}@", text)
    return _SECRET_PARAMETER.sub(lambda match: f"{match['head']}{MASK}", text)


def redact_all(data: Any) -> Any:
    """A copy of nested dicts, lists and tuples with every string redacted (a config, a run record)."""
    if isinstance(data, str):
        return redact(data)
    if isinstance(data, dict):
        return {key: redact_all(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(redact_all(value) for value in data)
    return data
