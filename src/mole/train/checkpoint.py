"""Resumable checkpoints: atomic (written under a temporary name, then renamed) and rotated.

A checkpoint is a folder ``checkpoints/step-00000042`` holding accelerate's ``save_state`` output (model,
optimizer, LR scheduler, EMA, every process's RNG states; DeepSpeed's own layout under ZeRO) and
``trainer_state.json`` (the step, which fixes the data position). Only complete checkpoints carry the
``step-`` name, so a run killed while saving leaves a ``.tmp-`` folder that resume ignores.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"


def checkpoint_dir(output: Path) -> Path:
    return output / "checkpoints"


def list_checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(output)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def resolve_resume(output: Path, resume: str | None) -> Path | None:
    """``latest`` → the newest complete checkpoint under ``output`` (None when there is none yet, so the
    same command starts fresh or resumes); a path → that checkpoint, which must be complete."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    return path


def temp_path(output: Path, step: int) -> Path:
    return checkpoint_dir(output) / f".tmp-step-{step:08d}"


def finalize(output: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Called on the main process after every process wrote into :func:`temp_path`: mark it complete,
    rename it into place, and delete all but the newest ``keep`` checkpoints."""
    tmp = temp_path(output, step)
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2) + "\n", encoding="utf-8")
    final = checkpoint_dir(output) / f"step-{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in checkpoint_dir(output).glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    logger.info("checkpoint saved: %s", final)
    return final


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
