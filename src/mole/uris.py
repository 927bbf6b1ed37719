"""Registry model URIs (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``): the one place they are parsed.

Plain string work, no mlflow import: the pipeline steps, evaluation and serving tell a registered model from a
local folder without loading the tracking client.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX = "models:/"
_URI = re.compile(r"models:/([^/@]+)(?:/(\d+)|@(.+))")


@dataclass(frozen=True)
class ModelURI:
    """A parsed ``models:/`` URI: exactly one of ``version`` and ``alias`` is set."""

    name: str
    version: str | None = None
    alias: str | None = None

    def __str__(self) -> str:
        return f"{PREFIX}{self.name}/{self.version}" if self.version else f"{PREFIX}{self.name}@{self.alias}"


def is_model_uri(value: object) -> bool:
    """Whether ``value`` names a registered model (``models:/...``) rather than a local path."""
    return str(value).startswith(PREFIX)


def parse_model_uri(uri: str) -> ModelURI | None:
    """``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` parsed; None for anything else (a path, ``runs:/``)."""
    m = _URI.fullmatch(uri or "")
    return ModelURI(m[1], m[2], m[3]) if m else None


def model_version(uri: str, what: str = "model") -> ModelURI:
    """A ``models:/NAME/VERSION`` URI, parsed.

    Raises:
        ValueError: ``uri`` is not of that form (an alias, a path); the message names ``what`` it is for.
    """
    parsed = parse_model_uri(uri)
    if parsed is None or parsed.version is None:
        raise ValueError(f"{what} must look like models:/NAME/VERSION, got {uri!r}")
    return parsed
