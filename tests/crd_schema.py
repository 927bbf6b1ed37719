"""Offline validation of custom resources against their CRD's schema, strictly (a misspelled field fails), the way
the API server's structural-schema pruning would drop it.

kubernetes-validate knows only the built-in kinds; a CRD's ``openAPIV3Schema`` is turned into a JSON Schema here:
``x-kubernetes-int-or-string`` becomes integer-or-string, ``nullable`` admits null, and every object with
declared properties refuses others unless it says ``x-kubernetes-preserve-unknown-fields``. The schemas live in
tests/schemas/ with their source (repository, commit, path) recorded in the file.
"""

from __future__ import annotations

import gzip
import json
from functools import cache
from pathlib import Path
from typing import Any

SCHEMAS = Path(__file__).resolve().parent / "schemas"


def strict_json_schema(node: Any) -> Any:
    if isinstance(node, list):
        return [strict_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: strict_json_schema(sub) for name, sub in value.items()}
        elif not key.startswith("x-kubernetes-") and key != "nullable":
            out[key] = strict_json_schema(value)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


@cache
def _validator(name: str):
    from jsonschema import Draft7Validator

    with gzip.open(SCHEMAS / f"{name}.json.gz", "rt", encoding="utf-8") as f:
        return Draft7Validator(strict_json_schema(json.load(f)["openAPIV3Schema"]))


def crd_errors(name: str, obj: dict[str, Any]) -> list[str]:
    """Every violation of the schema ``tests/schemas/<name>.json.gz``, as ``path: message``."""
    errors = sorted(_validator(name).iter_errors(obj), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '.'}: {e.message}" for e in errors]
