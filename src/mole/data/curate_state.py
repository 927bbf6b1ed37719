"""What a curation run is, written before its first chunk, so that a rerun can prove it continues the same work.

A curation resumes chunk by chunk (:mod:`mole.data.curate`). Chunks are positions in the sorted input list,
so a rerun with more inputs would shift every input after the new ones into chunks that are already done (two
inputs curated twice, two never), and a rerun with another ``size`` or ``image_format`` would mix both in one
dataset. ``curate_state.json`` records the kind, the input list (names and sizes), the resolved config and the
attribute/provenance tables, each with a digest; a rerun that differs is refused with what changed, or redone
from scratch with ``overwrite``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mole import atomic
from mole.data.shards import sha256_file

STATE_FILE = "curate_state.json"


class CurationChangedError(ValueError):
    """An interrupted curation in the output folder was started with other inputs, settings or tables."""


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def work_state(
    kind: str, root: Path, inputs: list[str], config: dict[str, Any], tables: dict[str, Path | None]
) -> dict[str, Any]:
    """The identity of a curation: kind, input list digest (relative names and byte sizes), resolved config and
    its digest, and the sha256 of each given table."""
    listing = "".join(f"{rel}\t{_size(root / rel)}\n" for rel in inputs)
    config_json = json.dumps(config, sort_keys=True, default=str)
    return {
        "kind": kind,
        "inputs": len(inputs),
        "inputs_digest": _digest(listing),
        "config": json.loads(config_json),
        "config_digest": _digest(config_json),
        "tables": {name: sha256_file(Path(p)) if p is not None else None for name, p in sorted(tables.items())},
    }


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size if path.is_symlink() else path.stat().st_size
    except OSError:
        return -1


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two work states (empty when it is the same work)."""
    out = []
    if old.get("kind") != new["kind"]:
        out.append(f"kind {old.get('kind')!r} -> {new['kind']!r}")
    if old.get("inputs_digest") != new["inputs_digest"]:
        out.append(f"the input files changed ({old.get('inputs')} -> {new['inputs']} files, or their sizes)")
    if old.get("config_digest") != new["config_digest"]:
        before, after = old.get("config") or {}, new["config"]
        keys = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
        out.append("settings " + ", ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in keys))
    for name in sorted(set(old.get("tables") or {}) | set(new["tables"])):
        if (old.get("tables") or {}).get(name) != new["tables"].get(name):
            out.append(f"the --{name} table changed")
    return out


def begin(out: Path, state: dict[str, Any], has_chunks: bool) -> None:
    """Write ``state`` for a fresh run, or check that a run with finished chunks is the same work.

    Raises:
        CurationChangedError: Chunks exist and were written for other inputs, settings or tables (or by a version
            that recorded no state, so nothing can be proved).
    """
    path = out / STATE_FILE
    if has_chunks:
        if not path.is_file():
            raise CurationChangedError(
                f"{out} holds chunks of an interrupted curation that recorded no {STATE_FILE}, so it cannot be proved "
                "to be the same work; pass --overwrite to start over"
            )
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = differences(old, state)
        if changed:
            raise CurationChangedError(
                f"{out} holds an interrupted curation of other work ({'; '.join(changed)}); resuming would mix "
                "the two. Rerun with the same inputs and settings, or pass --overwrite to start over"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, state, indent=1, ensure_ascii=False)
