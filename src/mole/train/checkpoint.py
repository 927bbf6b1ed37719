"""Resumable checkpoints: atomic (written under a temporary name, then renamed) and rotated.

A checkpoint is a folder ``checkpoints/step-00000042`` holding accelerate's ``save_state`` output (model,
optimizer, LR scheduler, every process's RNG states; DeepSpeed's own layout under ZeRO), the EMA as
``ema.safetensors`` + ``ema.json``, and ``trainer_state.json`` (the step, which fixes the data position). Only
complete checkpoints carry the ``step-`` name, so a run killed while saving leaves a ``.tmp-`` folder that resume
ignores.

Nothing in a checkpoint is unpickled into arbitrary objects: accelerate loads its files with
``weights_only=True``, and the EMA is not registered with accelerate (whose custom-object state,
``custom_checkpoint_N.pkl``, is loaded with ``weights_only=False``) but stored as tensors + JSON here. A checkpoint
that holds such a pickle is refused (:func:`refuse_pickles`). DeepSpeed's own checkpoint loader still unpickles
its files: see docs/security.md.
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
EMA_WEIGHTS = "ema.safetensors"
EMA_STATE = "ema.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed safely (it holds a pickle, or its EMA is missing)."""


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


def refuse_pickles(checkpoint: Path) -> None:
    """Refuse a checkpoint holding accelerate custom-object pickles before anything is loaded: unpickling one
    runs whatever code it names. mole writes none (the EMA is tensors + JSON); older checkpoints had one."""
    found = sorted(p.name for p in checkpoint.glob("custom_checkpoint_*.pkl"))
    if found:
        raise CheckpointError(
            f"{checkpoint} holds {', '.join(found)}: a pickle that would run code when loaded, which mole no longer "
            "writes or reads (the EMA is stored as safetensors + JSON). Start this run fresh (remove the checkpoints "
            "folder) or resume from a checkpoint written by this version."
        )


def save_ema(ema: Any, folder: Path) -> None:
    """Write diffusers' ``EMAModel`` state into ``folder``: shadow tensors as safetensors, the scalars as JSON."""
    from safetensors.torch import save_file

    state = dict(ema.state_dict())
    shadow = state.pop("shadow_params")
    save_file({f"shadow.{i:05d}": t.detach().cpu().contiguous() for i, t in enumerate(shadow)}, folder / EMA_WEIGHTS)
    (folder / EMA_STATE).write_text(json.dumps({**state, "num_shadow": len(shadow)}, indent=1) + "\n", "utf-8")


def load_ema(ema: Any, folder: Path) -> None:
    """Restore what :func:`save_ema` wrote (tensors only, never a pickle) into ``ema``.

    Raises:
        CheckpointError: The checkpoint has no EMA (it was written with ``ema_decay`` unset), or it is incomplete.
    """
    from safetensors.torch import load_file

    if not (folder / EMA_WEIGHTS).is_file() or not (folder / EMA_STATE).is_file():
        raise CheckpointError(f"{folder} has no EMA state ({EMA_WEIGHTS}); it was written without ema_decay")
    state = json.loads((folder / EMA_STATE).read_text(encoding="utf-8"))
    tensors = load_file(folder / EMA_WEIGHTS)
    count = int(state.pop("num_shadow"))
    if len(tensors) != count or count != len(ema.shadow_params):
        trains = len(ema.shadow_params)
        raise CheckpointError(f"{folder}: the EMA holds {len(tensors)} tensors, this model trains {trains}")
    ema.load_state_dict({**state, "shadow_params": [tensors[f"shadow.{i:05d}"] for i in range(count)]})


#: Settings that may differ between a run and its resumption: they change how long it runs, what it reports and
#: where, never what a step computes (``data`` is a path: the dataset's digest stands for its content).
RESUMABLE_SETTINGS = (
    "max_steps", "output", "data", "base_local", "checkpoint_every", "keep_checkpoints", "log_every",
    "validation_every", "validation_prompts", "validation_steps", "num_workers",
    # speed switches (issue 15): how a step runs, not what it computes
    "gradient_checkpointing", "channels_last", "allow_tf32", "pin_memory", "compile", "foreach", "save_dtype",
    # where cached latents live (a path, as ``data``; on disk they are fp16-rounded, far below the diffusion noise)
    "latent_cache_dir",
)  # fmt: skip
GUARD_KEY = "resume_guard"


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value if isinstance(value, str | int | float | bool | type(None)) else json.dumps(value)
    return out


def resume_guard(data_digest: str, settings: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint records so that a resumption can prove it continues the same work: the dataset digest
    and every setting that changes what a step computes (flattened to dotted keys)."""
    flat = _flatten("", settings, {})
    kept = {k: v for k, v in flat.items() if k.rsplit(".", 1)[-1] not in RESUMABLE_SETTINGS}
    return {"data_digest": data_digest, "settings": dict(sorted(kept.items()))}


def resume_changes(checkpoint: Path, guard: dict[str, Any]) -> list[str] | None:
    """What differs between the run that wrote ``checkpoint`` and this one (``key: old -> new``), or None when the
    checkpoint predates the guard and nothing can be compared."""
    recorded = read_state(checkpoint).get(GUARD_KEY)
    if not isinstance(recorded, dict):
        return None
    changes = []
    if recorded.get("data_digest") != guard["data_digest"]:
        changes.append(f"data: digest {str(recorded.get('data_digest'))[:12]} -> {guard['data_digest'][:12]}")
    old, new = recorded.get("settings", {}), guard["settings"]
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<unset>") != new.get(key, "<unset>"):
            changes.append(f"{key}: {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}")
    return changes


def check_resume(checkpoint: Path, guard: dict[str, Any], *, allow_changed: bool) -> list[str]:
    """Refuse to resume ``checkpoint`` with other data or other hyperparameters unless ``allow_changed``.

    Returns:
        The changes that are allowed (empty when it is the same work).

    Raises:
        CheckpointError: Something changed and ``allow_changed`` is false; the message lists what.
    """
    changes = resume_changes(checkpoint, guard)
    if changes is None:
        logger.warning("%s predates resume checks: cannot tell whether data or settings changed", checkpoint)
        return []
    if changes and not allow_changed:
        raise CheckpointError(
            f"refusing to resume {checkpoint}: this run differs from the one that wrote it ({'; '.join(changes)}). "
            "Give the same data and settings, start fresh in another --output, or pass --resume-changed to continue "
            "from these weights with the new data and settings"
        )
    return changes
