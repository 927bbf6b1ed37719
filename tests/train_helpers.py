"""Test-only measurements of training (kept out of the library: nothing in mole needs them)."""

from __future__ import annotations

import torch

from mole.train.config import TrainConfig
from mole.train.loop import encode_latents, stage_loss
from mole.train.stages import Stage


@torch.no_grad()
def fixed_batch_loss(stage: Stage, batch: dict[str, torch.Tensor], cfg: TrainConfig, seed: int = 1234) -> float:
    """Loss on a batch with noise and timesteps fixed by ``seed``: comparable before and after training."""
    was_training = stage.model.training
    stage.model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inputs = {
            "latents": encode_latents(stage.vae, batch["pixel_values"]),
            "input_ids": batch["input_ids"],
        }
        loss = stage_loss(stage, stage.model, inputs, cfg).item()
    stage.model.train(was_training)
    return loss
