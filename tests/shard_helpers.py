"""Datasets built by hand, byte by byte, as another tool following docs/data-format.md would write them."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

from mole.data.shards import FORMAT, compute_digest


def hand_built(path: Path, members: list[tuple[str, bytes]], num_samples: int, name: str = "hand") -> Path:
    """One shard of ``members`` (tar name, bytes) and its ``dataset.json`` in a new folder ``path``."""
    path.mkdir()
    with tarfile.open(path / "shard-000000.tar", "w") as tar:
        for member, data in members:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    sha = hashlib.sha256((path / "shard-000000.tar").read_bytes()).hexdigest()
    index = {"format": FORMAT, "name": name, "kind": "faces", "num_samples": num_samples, "created_by": "test",
             "shards": [{"path": "shard-000000.tar", "num_samples": num_samples, "sha256": sha}],
             "digest": compute_digest([sha]), "meta": {}}  # fmt: skip
    (path / "dataset.json").write_text(json.dumps(index))
    return path
