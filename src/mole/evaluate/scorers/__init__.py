"""Scorers of generated images against their prompts, all behind one interface, weights only from local paths.

=============== ============================================================== ===================================
name            what                                                           files (config keys)
=============== ============================================================== ===================================
``clip``        CLIP score, 100 × max(cos, 0)                                  ``model``: transformers CLIP folder
``hps_v1``      HPS v1 (the paper's "HPS"), 100 × cos of a tuned CLIP ViT-L/14 ``checkpoint``: hpc.pt; ``tokenizer``
``hps_v2``      HPS v2 / v2.1, 100 × cos of a tuned open_clip ViT-H-14         ``checkpoint``: HPS_v2*.pt;
                                                                               ``tokenizer``
``imagereward`` ImageReward (the paper's "IR", reported × 100)                 ``checkpoint``: ImageReward.pt;
                                                                               ``med_config``; ``tokenizer``
=============== ============================================================== ===================================

Every scorer also reads ``batch_size``, ``dtype`` (``float32`` by default) and ``device`` (CUDA when available).
Nothing is ever downloaded: every loader is given local paths (``local_files_only=True`` where transformers
takes it), and a missing file raises ``FileNotFoundError`` naming the path and what the scorer needs. See
``docs/evaluation.md`` for where each file comes from.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image

logger = logging.getLogger(__name__)

__all__ = ["SCORER_NAMES", "Scorer", "build_scorer"]


@runtime_checkable
class Scorer(Protocol):
    """Scores (image, prompt) pairs; higher means better by the scorer's criterion."""

    name: str

    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        """One float per pair, in input order. ``len(images)`` must equal ``len(prompts)``."""
        ...


def _builders() -> dict[str, Callable[[Mapping[str, Any], str | torch.device | None], Scorer]]:
    # Imported here: the scorer modules pull in transformers, which takes seconds to import.
    from mole.evaluate.scorers.clip_scorers import build_clip, build_hps_v1, build_hps_v2
    from mole.evaluate.scorers.imagereward import build_imagereward

    return {"clip": build_clip, "hps_v1": build_hps_v1, "hps_v2": build_hps_v2, "imagereward": build_imagereward}


#: The names :func:`build_scorer` accepts.
SCORER_NAMES: tuple[str, ...] = ("clip", "hps_v1", "hps_v2", "imagereward")
_ALIASES = {"hps": "hps_v1", "hpsv1": "hps_v1", "hpsv2": "hps_v2", "hps_v2.1": "hps_v2", "image_reward": "imagereward",
            "ir": "imagereward", "clip_score": "clip"}  # fmt: skip


def build_scorer(name: str, config: Mapping[str, Any], device: str | None = None) -> Scorer:
    """Build a scorer from local files.

    Args:
        name: One of :data:`SCORER_NAMES` (case-insensitive; ``hps`` means ``hps_v1``, ``ir`` ``imagereward``).
        config: The scorer's settings (see the module table), or a mapping of scorer names to settings, from
            which ``config[name]`` is taken, so one evaluation config can hold every scorer's section.
        device: Overrides ``config["device"]``; by default CUDA when available, else CPU.

    Raises:
        ValueError: If the name is unknown or a required config key is missing.
        FileNotFoundError: If a checkpoint, config or tokenizer file is missing (names it).
    """
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in SCORER_NAMES:
        raise ValueError(f"unknown scorer {name!r}; choose from {list(SCORER_NAMES)}")
    for section in (name, key):
        if isinstance(config.get(section), Mapping):
            config = config[section]
            break
    scorer = _builders()[key](config, device)
    logger.info("built scorer %r", scorer)
    return scorer
