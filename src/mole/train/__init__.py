"""Training: one loop (loop.py) configured by three stage specs (stages.py) from one typed config (config.py);
orchestrate.py runs a stage end to end (tracking, lineage, registration). This file only re-exports.

* :mod:`mole.train.config`: the typed recipe, its validation and ``--set`` overrides;
* :mod:`mole.train.orchestrate`: :func:`train_stage`, what ``mole train`` and the pipeline call;
* :mod:`mole.train.stages`: what each stage trains (base, experts, gates) and writes;
* :mod:`mole.train.loop`: the one training loop (accelerate/DeepSpeed), :mod:`mole.train.checkpoint` its resume;
* :mod:`mole.train.model`: text encoder + UNet and the diffusion objective; :mod:`mole.train.data`: datasets,
  augmentation and the mixture; :mod:`mole.train.metrics`: the interface training reports through.
"""

from __future__ import annotations

from mole.train.config import ConfigError, MoleConfig, load_config
from mole.train.orchestrate import train_stage

__all__ = ["ConfigError", "MoleConfig", "load_config", "train_stage"]
