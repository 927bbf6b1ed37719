"""What a training stage writes, read back: every command that takes a model or gates accepts the stage's folder.

A stage's ``--output`` folder holds its ``result.json`` and its product: stage 1 a diffusers folder ``model/``,
an expert its LoRA file (read by :func:`mole.inject.load_expert`, which already takes the folder), the gates
stage ``gates.safetensors`` with its JSON sidecar. The readers here take either the product itself or the folder
the stage wrote, and log what they found, so that ``--base out/stage1`` and ``--gates out/gates`` mean what they
obviously mean.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

#: Stage 1's diffusers folder inside its output folder.
STAGE1_MODEL = "model"
#: The gates stage's file inside its output folder (its settings beside it as ``gates.json``).
GATES_FILE = "gates.safetensors"


def model_folder(path: str | os.PathLike[str]) -> Path:
    """A diffusers Stable Diffusion folder: ``path`` itself when it holds ``model_index.json``, else the
    ``model/`` folder stage 1 wrote inside it.

    Raises:
        FileNotFoundError: Neither (the message says what was looked for and what writes such a folder).
    """
    given = Path(path)
    if (given / "model_index.json").is_file():
        return given
    inner = given / STAGE1_MODEL
    if (inner / "model_index.json").is_file():
        logger.info("%s is a stage-1 output folder: using its model %s", given, inner)
        return inner
    raise FileNotFoundError(
        f"{given} is not a diffusers model folder (no model_index.json in it nor in {inner}); give a model written "
        "by `mole tiny init`, stage 1's --output folder, or a folder from diffusers' save_pretrained"
    )


def gates_file(path: str | os.PathLike[str]) -> Path:
    """A gates file: ``path`` itself when it is a file, else the ``gates.safetensors`` the gates stage wrote in
    the folder ``path``.

    Raises:
        FileNotFoundError: Neither (the message names both places).
    """
    given = Path(path)
    if given.is_file():
        return given
    inner = given / GATES_FILE
    if given.is_dir() and inner.is_file():
        logger.info("%s is a gates-stage output folder: using its gates file %s", given, inner)
        return inner
    where = f" nor a folder holding {GATES_FILE}" if given.is_dir() else ""
    raise FileNotFoundError(f"gates file not found: {given} is not a file{where} (give the gates stage's --output "
                            f"folder or its {GATES_FILE})")  # fmt: skip
