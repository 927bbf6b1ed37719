"""The two rules every input passes before it can touch a path, a log line or a tracking server.

* :func:`check_name`: an expert (or any other user-chosen) name becomes a folder name (``experts/<name>``), a
  registered model name (``mole-expert-<name>``), a parameter key (``experts.<name>.rank``) and a key inside
  gate files. One pattern, checked here, keeps a name from ever being a path (``/some/dir``, ``../../x``), a
  dotted key (``a.b``) or empty.
* :func:`redact`: credentials in URIs (``scheme://user:pass@host``), signed-URL tokens and the values of
  credential-like environment variables are masked in anything that is logged, stored as an MLflow param or
  tag, or shown in an error message. :class:`RedactingFilter` applies it to every log record of a handler.

docs/security.md says who controls which input and where each rule is enforced.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
"""Lower-case letter first, then lower-case letters, digits, ``_`` or ``-``; at most 64 characters."""

_SECRET_ENV = re.compile(r"secret|password|passwd|token|credential|access_key|api_key|auth", re.IGNORECASE)
# scheme://user[:pass]@, and scheme:/user:pass@ (what pathlib makes of a URI given as a path); not
# scheme:/name@alias, which is MLflow's models:/mole@champion
_URI_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://)[^/\s@?#]+@|(\b[a-zA-Z][\w+.-]*:/)[^/\s@?#:]+:[^/\s@?#]+@")
_QUERY_SECRET = re.compile(
    r"([?&](?:X-Amz-[\w-]+|token|sig|signature|key|access_key|secret|password|api_key)=)[^&\s#]+", re.I
)


class InvalidNameError(ValueError):
    """A name that could become a path or break a dotted key; the message says which rule it breaks."""


def check_name(name: object, what: str = "expert name") -> str:
    """Return ``name`` when it satisfies :data:`NAME_PATTERN`, else raise :class:`InvalidNameError`.

    Args:
        name: The user-supplied name (CLI, config section, pipeline parameter, registry).
        what: What the name is, for the message ("expert name", "--experts").
    """
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidNameError(
            f"{what} {name!r} is not allowed: a name starts with a lower-case letter and has only lower-case "
            "letters, digits, '_' and '-' (at most 64 characters), so it can never be a path or a dotted key"
        )
    return name


def _env_secrets() -> list[str]:
    """Values of credential-like environment variables, longest first (so no prefix leaks); values shorter
    than 6 characters are not credentials worth masking and would mangle ordinary words."""
    values = {v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= 6}
    return sorted(values, key=len, reverse=True)


def redact(text: Any) -> str:
    """``text`` (anything; ``str()`` of it) with credentials masked: the one redaction for logs, params and errors.

    Masks the userinfo of every URI (``s3://user:pass@bucket`` -> ``s3://***@bucket``; a user alone can be a
    token, as in ``https://TOKEN@host``), secret query parameters of signed URLs (``X-Amz-Signature=***``), and any
    value of a credential-like environment variable (``AWS_SECRET_ACCESS_KEY``, ``MLFLOW_TRACKING_PASSWORD``...).
    """
    out = str(text)
    out = _URI_USERINFO.sub(lambda m: (m.group(1) or m.group(2)) + "***@", out)
    out = _QUERY_SECRET.sub(r"\1***", out)
    for value in _env_secrets():
        out = out.replace(value, "***")
    return out


def holds_env_secret(text: str) -> bool:
    """Whether ``text`` contains the value of a credential-like environment variable."""
    return any(value in text for value in _env_secrets())


def is_secret_key(key: str) -> bool:
    """Whether a parameter or variable named ``key`` holds a credential by its name alone."""
    return bool(_SECRET_ENV.search(key))


class RedactingFilter(logging.Filter):
    """Rewrites every record a handler emits through :func:`redact` (message and arguments formatted first).

    Installed on the CLI's log handler, so no library log line (``MLflow run ... at URI``) can print a
    credential, whoever wrote it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: let the handler report it as it would
            return True
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True
