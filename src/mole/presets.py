"""The YAML presets shipped with the package (``configs/``: tiny.yaml, paper.yaml, curate.yaml, accelerate/).

``configs/`` at the repository root is their one copy; the package reaches it through ``src/mole/configs`` (a
link in the checkout, real files in an installed wheel), so an installed ``mole`` — the image, a pipeline pod,
a laptop without the checkout — finds ``configs/paper.yaml`` from any working folder, with no ``MOLE_HOME``.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

#: How the presets are spelled on the command line and in pipeline parameters.
PREFIX = "configs/"


def packaged(name: str) -> Path:
    """The shipped preset ``name`` (``"paper.yaml"``, ``"configs/paper.yaml"``, ``"accelerate/zero2.yaml"``).

    Raises:
        FileNotFoundError: No such preset (the message lists the shipped ones).
    """
    rel = name.removeprefix(PREFIX).lstrip("/")
    root = Path(str(resources.files("mole") / "configs"))
    candidate = root / rel
    if rel and ".." not in Path(rel).parts and candidate.is_file():
        return candidate
    raise FileNotFoundError(f"no preset {name!r}; the package ships: {', '.join(available())}")


def available() -> list[str]:
    """The shipped presets as ``configs/...`` paths, sorted."""
    root = Path(str(resources.files("mole") / "configs"))
    if not root.is_dir():
        return []
    return sorted(PREFIX + p.relative_to(root).as_posix() for p in root.rglob("*.yaml"))


def resolve(path: str | os.PathLike[str]) -> Path:
    """A config as given when that file exists (relative to the working folder), else the shipped preset of the
    same name: ``configs/paper.yaml`` works from a checkout, from any other folder and inside the image.

    Raises:
        FileNotFoundError: Neither a file nor a shipped preset (the message lists the shipped ones).
    """
    given = Path(path)
    if given.is_file():
        return given
    if given.is_absolute():
        raise FileNotFoundError(f"config {str(path)!r} not found")
    try:
        return packaged(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"config {str(path)!r} not found in the working folder nor among the shipped presets "
            f"({', '.join(available())})"
        ) from None
