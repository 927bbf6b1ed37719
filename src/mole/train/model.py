"""The model the loop trains: text encoder + UNet in one module, the diffusion objective, Min-SNR weights.

DeepSpeed wants exactly one model per Accelerator, so the UNet and the text encoder live in one
``nn.Module`` whatever is trainable; the frozen VAE stays outside (the loop encodes latents first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) at each timestep. ``[B]``."""
    ac = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return ac / (1.0 - ac)


def min_snr_weights(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023) for an MSE on the model's own prediction target.

    min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR + 1) for v-prediction. ``[B]``.
    """
    s = snr(alphas_cumprod, timesteps)
    clipped = torch.clamp(s, max=gamma)
    if prediction_type == "epsilon":
        return clipped / s
    if prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    raise ValueError(f"Min-SNR weights are defined for epsilon and v_prediction, not {prediction_type!r}")


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of (optionally weighted) per-sample MSE."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)  # [B]
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


class DiffusionModel(nn.Module):
    """UNet + text encoder with the denoising objective: ``forward(batch) -> (pred, target, timesteps)``.

    Args:
        unet: The diffusers UNet (possibly with LoRA or MoLE layers).
        text_encoder: CLIP text encoder; run without gradients unless ``train_text_encoder``.
        noise_scheduler: A diffusers scheduler with ``add_noise`` / ``get_velocity`` (DDPM).
        prediction_type: ``epsilon`` or ``v_prediction``.
        noise_offset: Offset-noise strength (0 disables).
    """

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module,
        noise_scheduler,
        prediction_type: str,
        train_text_encoder: bool = False,
        noise_offset: float = 0.0,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.noise_scheduler = noise_scheduler
        self.prediction_type = prediction_type
        self.train_text_encoder = train_text_encoder
        self.noise_offset = noise_offset
        self.num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)
        #: Give the UNet channels-last inputs (set with its weights by the loop's speed settings).
        self.channels_last = False

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the UNet's weights: what its inputs must be (bf16/fp16 under DeepSpeed, else fp32).

        Read from the first floating-point parameter; under ZeRO-3 a partitioned parameter keeps its dtype.
        """
        for param in self.unet.parameters():
            if param.is_floating_point():
                return param.dtype
        return torch.float32

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Last hidden state of the text encoder (clip skip 1, as the paper): ``[B, 77, D]``."""
        if self.train_text_encoder:
            return self.text_encoder(input_ids)[0]
        with torch.no_grad():
            return self.text_encoder(input_ids)[0]

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noise the latents at random timesteps and predict.

        Args:
            batch: ``latents`` ``[B, 4, h, w]`` (already scaled by the VAE factor) and either ``input_ids``
                ``[B, 77]`` or cached ``encoder_hidden_states`` ``[B, 77, D]``.

        Returns:
            ``(pred, target, timesteps)``: the UNet output, what it should have been (noise or velocity),
            and the timesteps ``[B]``.
        """
        # Noise, noising and the target in fp32 whatever the weights hold; only the UNet's inputs take the
        # weights' dtype. Under DeepSpeed bf16/fp16 the engine holds 16-bit weights and runs no autocast, so an
        # fp32 input would meet a bf16 Linear (`mat1 and mat2 must have the same dtype`); under DDP/autocast
        # the weights are fp32 and this is a no-op.
        dtype = self.compute_dtype
        # Contiguous: randn_like keeps its input's memory layout, so a channels-last VAE output (what the CPU
        # convolutions return) would lay the same random stream out differently from cached latents' layout;
        # the noise now depends on the seed only, not on where the latents came from.
        latents = batch["latents"].float().contiguous()
        noise = torch.randn_like(latents)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn(
                latents.shape[0], latents.shape[1], 1, 1, device=latents.device, dtype=latents.dtype
            )
        timesteps = torch.randint(0, self.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if "encoder_hidden_states" in batch:
            states = batch["encoder_hidden_states"]
        else:
            states = self.encode_text(batch["input_ids"])
        noisy = noisy.to(dtype)
        if self.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        pred = self.unet(noisy, timesteps, states.to(dtype)).sample
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction type {self.prediction_type!r}")
        return pred, target, timesteps
