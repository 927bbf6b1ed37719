"""One stage-1 training run for :mod:`bench.train_throughput`, launched by ``accelerate launch`` (ZeRO-2):
``--which mole`` runs mole's loop (:func:`mole.train.train_stage`), ``--which plain`` the plain loop below.

The plain loop is diffusers' ``examples/text_to_image/train_text_to_image.py`` reduced to its training step —
VAE (in the mixed-precision dtype) → noise → text encoder → UNet → Min-SNR-weighted MSE → backward → clip →
step — with the same settings as mole's: UNet and text encoder trained (in one module, as DeepSpeed needs),
gradient checkpointing on both, Lion, the same data reader and batch. It writes ``{samples_per_second,
seconds_per_step, peak_memory_gib}`` to ``--result``; samples/s is the median over windows of 5 steps, the
first window left out, the same rule as mole's metrics.

    accelerate launch --config_file configs/accelerate/zero2.yaml --num_processes 1 \\
        -m bench.gpu_stage1 --which plain --model M --data D --output O --result R.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

LOG_EVERY = 5
# The paper's stage-1 optimizer (configs/paper.yaml).
LION = {"lr": 2.0e-6, "betas": (0.9, 0.99), "weight_decay": 1.0e-2}


def write_model(folder: Path, tiny: bool = False) -> Path:
    """A diffusers folder with SD1.5's architecture (UNet, ViT-L/14 text encoder, VAE) and random weights; or the
    embedded default with ``tiny``. The tokenizer is mole's small BPE one: the token ids fit CLIP's vocabulary."""
    from mole.tiny import init_tiny_model, write_tokenizer

    if tiny:
        return init_tiny_model(folder, overwrite=True)
    import tempfile

    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(tmp))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512,
    )  # fmt: skip
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _window_rate(step_times: list[float], batch: int) -> float:
    windows = [sum(step_times[i : i + LOG_EVERY]) for i in range(0, len(step_times) - LOG_EVERY + 1, LOG_EVERY)]
    steady = windows[1:] or windows
    return statistics.median(LOG_EVERY * batch / w for w in steady)


def _peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def run_mole(args: argparse.Namespace) -> dict[str, Any]:
    from bench.train_throughput import window_throughput
    from mole.train import load_config, train_stage

    overrides = {
        "model.resolution": args.resolution,
        "stage1.max_steps": args.steps,
        "stage1.batch_size": args.batch,
        "stage1.train_text_encoder": True,
        "stage1.gradient_checkpointing": True,
        "stage1.mixed_precision": "no" if args.smoke else "bf16",
        "stage1.optimizer": {"name": "lion", **LION},
        "stage1.min_snr_gamma": 5.0,
        "stage1.log_every": LOG_EVERY,
        "stage1.checkpoint_every": args.steps,
        "stage1.validation_prompts": [],
    }
    recipe = load_config(None, overrides)
    train_stage("stage1", recipe, output=args.output, data=str(args.data), base=str(args.model))
    info = json.loads((Path(args.output) / "result.json").read_text(encoding="utf-8"))
    return {**window_throughput(Path(args.output) / "metrics.jsonl"), "zero_stage": info.get("zero_stage")}


class _Both(nn.Module):
    """UNet + text encoder as one module: DeepSpeed takes one model per Accelerator."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module) -> None:
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        states = self.text_encoder(input_ids)[0]
        return self.unet(noisy, timesteps, states).sample


def run_plain(args: argparse.Namespace) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import compute_snr
    from lion_pytorch import Lion
    from transformers import CLIPTextModel, CLIPTokenizer

    from mole.train.data import ImageCaptionDataset, collate

    cuda = torch.cuda.is_available()
    handlers = [] if cuda else [InitProcessGroupKwargs(backend="gloo")]
    accelerator = Accelerator(mixed_precision="bf16" if cuda and not args.smoke else "no", kwargs_handlers=handlers)
    weight_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    tokenizer = CLIPTokenizer.from_pretrained(args.model, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(args.model, subfolder="scheduler")
    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae").requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(args.model, subfolder="text_encoder")
    unet.enable_gradient_checkpointing()
    text_encoder.gradient_checkpointing_enable()
    model = _Both(unet, text_encoder).train()
    optimizer = Lion(model.parameters(), **LION)
    dataset = ImageCaptionDataset(str(args.data), tokenizer, args.resolution, caption_dropout=0.1)
    loader = torch.utils.data.DataLoader(
        [(i, e) for e in range(1000) for i in range(len(dataset))][: args.steps * args.batch],
        batch_size=args.batch, shuffle=False, collate_fn=lambda items: collate([dataset[it] for it in items]),
    )  # fmt: skip
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        ds = plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = args.batch
        ds["gradient_accumulation_steps"] = 1
        ds["train_batch_size"] = args.batch * accelerator.num_processes
        ds["gradient_clipping"] = 1.0
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    vae.to(accelerator.device, dtype=weight_dtype)  # as train_text_to_image: the frozen VAE in weight_dtype
    step_times = []
    t0 = time.perf_counter()
    for batch in loader:
        with accelerator.accumulate(model):
            pixels = batch["pixel_values"].to(accelerator.device, weight_dtype)
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                                      device=latents.device)  # fmt: skip
            noisy = scheduler.add_noise(latents, noise, timesteps)
            pred = model(noisy, timesteps, batch["input_ids"].to(accelerator.device))
            snr = compute_snr(scheduler, timesteps)
            weights = torch.clamp(snr, max=5.0) / snr
            loss = nn.functional.mse_loss(pred.float(), noise.float(), reduction="none").mean((1, 2, 3)) * weights
            loss = loss.mean()
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss.item()  # the step is done when its loss is on the host (as the loop's logging does)
        now = time.perf_counter()
        step_times.append(now - t0)
        t0 = now
    return {
        "samples_per_second": _window_rate(step_times, args.batch),
        "windows": len(step_times) // LOG_EVERY - 1,
        "zero_stage": int(plugin.zero_stage) if plugin is not None else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--which", choices=["mole", "plain"], required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, fp32")
    args = parser.parse_args()
    args.resolution = 64 if args.smoke else 512
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = run_mole(args) if args.which == "mole" else run_plain(args)
    result.update(peak_memory_gib=_peak_gib(), wall_seconds=time.perf_counter() - t0, steps=args.steps)
    if int(os.environ.get("RANK", "0")) == 0:
        args.result.parent.mkdir(parents=True, exist_ok=True)
        args.result.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
