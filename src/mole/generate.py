"""Text-to-image generation with a base model, fixed-scale experts, or the full MoLE mixture."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mole.inject import GateTrace, apply_mole, apply_mole_from_gates, record_gates

logger = logging.getLogger(__name__)

#: Bounds that keep a request from exhausting memory or time; shared with the service.
MAX_SIDE = 2048
MAX_STEPS = 200
MAX_GUIDANCE = 30.0


@dataclass
class Generation:
    """Images of one call, with the seed of each and (for MoLE, when asked) the gate trace."""

    images: list[Any]  # list[PIL.Image.Image]
    seeds: list[int]
    prompts: list[str]
    gate_trace: GateTrace | None = None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(
    model: str | os.PathLike[str],
    experts: Mapping[str, str | os.PathLike[str]] | None = None,
    gates: str | os.PathLike[str] | None = None,
    expert_scales: Mapping[str, float] | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    compile_unet: bool = False,
):  # -> diffusers.StableDiffusionPipeline
    """Load a diffusers folder and, optionally, put experts (and gates) on its UNet.

    Args:
        model: A diffusers Stable Diffusion folder (``model_index.json`` inside), or stage 1's output folder.
        experts: ``{name: lora_path}``. Without ``gates`` they are applied at fixed scales.
        gates: A gates file from stage 3 (or that stage's output folder): full MoLE, gate mode and expert order
            taken from it.
        expert_scales: Fixed scale per expert when no gates are given (default 1.0).
        device: ``cuda``/``cpu``; default CUDA when available.
        dtype: Default float16 on CUDA, float32 on CPU.
        compile_unet: Compile the UNet (``torch.compile`` with CUDA graphs, :mod:`mole.compile`); on CPU, or when
            compiling fails, it stays eager with a logged warning.
    """
    from diffusers import StableDiffusionPipeline

    from mole.outputs import gates_file, model_folder

    model = model_folder(model)  # or stage 1's output folder
    if gates is not None:
        gates = gates_file(gates)  # or the gates stage's output folder
    if gates is not None and not experts:
        raise ValueError("gates need the experts they were trained with (--experts NAME=PATH ...)")
    if expert_scales and gates is not None:
        raise ValueError("expert scales apply without gates only; with gates the mixture is learned")
    device = device or default_device()
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    pipe = StableDiffusionPipeline.from_pretrained(
        model, dtype=dtype, safety_checker=None, requires_safety_checker=False
    )
    if experts:
        if gates is not None:
            apply_mole_from_gates(pipe.unet, experts, gates)
        else:
            apply_mole(pipe.unet, experts, gate="none", expert_weights=expert_scales)
    pipe.set_progress_bar_config(disable=True)
    # Nothing trains here: frozen gates let every MoLE layer keep its stacked weight between calls.
    pipe.unet.requires_grad_(False)
    pipe = pipe.to(device)
    if compile_unet:
        from mole.compile import compile_unet as compile_

        compile_(pipe.unet)
    return pipe


def validate_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if value < 8 or value > MAX_SIDE or value % 8:
            raise ValueError(f"{name} must be a multiple of 8 between 8 and {MAX_SIDE}, got {value}")


def generate(
    pipe: Any,
    prompts: Sequence[str],
    *,
    negative_prompt: str | None = None,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 7.5,
    width: int | None = None,
    height: int | None = None,
    num_images: int = 1,
    record: bool = False,
    seeds: Sequence[int] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> Generation:
    """Generate ``num_images`` per prompt.

    Image k gets its own generator seeded ``seed + k``, so an image depends on its seed only, not on how
    many images share the batch.

    Args:
        record: Keep the MoLE gate values of every denoising step (needs MoLE layers).
        seeds: One seed per output image (overrides ``seed``): evaluation gives a prompt the same seed in
            every model it compares.
        on_step: Called with the step index after every denoising step; it may raise to stop the generation
            (the service does so when a request times out).
    """
    if not prompts or any(not p.strip() for p in prompts):
        raise ValueError("at least one non-empty prompt is needed")
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be in 1..{MAX_STEPS}, got {steps}")
    if not 0.0 <= guidance <= MAX_GUIDANCE:
        raise ValueError(f"guidance must be in 0..{MAX_GUIDANCE}, got {guidance}")
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    width, height = width or native, height or native
    validate_size(width, height)
    all_prompts = [p for p in prompts for _ in range(num_images)]
    if seeds is not None:
        if len(seeds) != len(all_prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(all_prompts)} images")
        seeds = [int(x) for x in seeds]
    else:
        seeds = [seed + k for k in range(len(all_prompts))]
    device = pipe.device
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    # Initial noise drawn on the CPU from per-image generators: the same seed gives the same image on
    # CPU and GPU up to kernel differences, and independently of the batch.
    shape = (1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    latents = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(device, pipe.unet.dtype)
    kwargs: dict[str, Any] = {
        "prompt": all_prompts,
        "negative_prompt": [negative_prompt] * len(all_prompts) if negative_prompt else None,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "width": width,
        "height": height,
        "latents": latents,
    }
    if on_step is not None:

        def _callback(_pipe: Any, step: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            on_step(step)
            return tensors

        kwargs["callback_on_step_end"] = _callback
    trace = None
    with torch.inference_mode():
        if record:
            with record_gates(pipe.unet) as trace:
                images = pipe(**kwargs).images
        else:
            images = pipe(**kwargs).images
    return Generation(images=images, seeds=seeds, prompts=all_prompts, gate_trace=trace)


def output_paths(output: str | os.PathLike[str], count: int) -> list[Path]:
    """Where ``count`` images go: ``x.png`` for one, ``x-0.png, x-1.png...`` for several, or a folder."""
    output = Path(output)
    if output.suffix.lower() == ".png":
        if count == 1:
            return [output]
        return [output.with_name(f"{output.stem}-{k}.png") for k in range(count)]
    return [output / f"{k:03d}.png" for k in range(count)]
