"""Atomic local writes, one convention: write ``.<name>.tmp-<pid>`` beside the target, then rename it into place.

A reader never sees a half-written file under the real name: a crash leaves at most a hidden temporary file
(hidden, so dataset and model folders list clean; the pid, so that two writers of the same file never share
one). :func:`replace_together` commits several files that belong together (the gates weights and their JSON
settings): every temporary is complete before the first rename, and the one that carries the decisive content
is renamed last, so that it is the commit point. (Checkpoint folders keep their own ``.tmp-step-N`` folders,
which resume recognises; object stores get a single PUT, which is atomic already.)
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def temp_path(path: str | os.PathLike[str]) -> Path:
    """The temporary name of ``path`` for this process: ``<folder>/.<name>.tmp-<pid>``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def is_temp(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is one of these temporaries (a leftover of an interrupted write)."""
    name = Path(path).name
    return name.startswith(".") and ".tmp-" in name


@contextlib.contextmanager
def replace_together(*paths: str | os.PathLike[str]) -> Iterator[list[Path]]:
    """Yield temporary paths for ``paths``; when the block ends without error, rename each into place in the
    order given (put the commit point last); on error, remove them and leave the targets untouched.

    Example::

        with replace_together(out / "gates.json", out / "gates.safetensors") as (settings, weights):
            settings.write_text(...)
            save_file(tensors, str(weights))
    """
    targets = [Path(p) for p in paths]
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
    temps = [temp_path(t) for t in targets]
    try:
        yield temps
        for tmp in temps:
            if not tmp.is_file():
                raise FileNotFoundError(f"nothing was written to {tmp} (for {targets[temps.index(tmp)]})")
        for tmp, target in zip(temps, targets, strict=True):
            os.replace(tmp, target)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def replaced(path: str | os.PathLike[str]) -> Iterator[Path]:
    """One file: yield its temporary path, rename it into place when the block succeeds."""
    with replace_together(path) as (tmp,):
        yield tmp


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with replaced(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns ``path``."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], data: Any, *, indent: int | None = 2, **dumps: Any) -> Path:
    """Write ``data`` as JSON (a trailing newline) to ``path`` atomically; returns ``path``."""
    return write_text(path, json.dumps(data, indent=indent, **dumps) + "\n")
