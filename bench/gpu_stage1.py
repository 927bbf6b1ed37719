"""One training run for :mod:`bench.train_throughput` and :mod:`bench.gpu_check`, launched by ``accelerate
launch`` (ZeRO-2): ``--which mole`` runs mole's loop (:func:`mole.train.train_stage`) for ``--stage`` stage1,
expert or gates with configs/paper.yaml's settings (speed switches included; ``--set`` overrides), ``--which
plain`` the plain stage-1 loop below.

The plain loop is diffusers' ``examples/text_to_image/train_text_to_image.py`` reduced to its training step —
VAE (in the mixed-precision dtype) every step → noise → text encoder → UNet → Min-SNR-weighted MSE → backward →
clip → step — with the settings of the issue's reference run: UNet and text encoder trained (in one module, as
DeepSpeed needs), gradient checkpointing on both, Lion, the same data reader. It writes ``{samples_per_second,
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
PAPER = Path(__file__).resolve().parent.parent / "configs" / "paper.yaml"
# The paper's stage-1 optimizer (configs/paper.yaml).
LION = {"lr": 2.0e-6, "betas": (0.9, 0.99), "weight_decay": 1.0e-2}


#: SD-shaped model sizes: SD1.5 itself, and a small one with SD1.5's block layout (four down/up blocks, cross
#: attention in three, 1x1 conv proj_in/out... the same 184-linear structure) at narrow widths, for GPU tests.
SIZES: dict[str, dict[str, Any]] = {
    "sd15": {"unet": {"sample_size": 64, "cross_attention_dim": 768},
             "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12},
             "vae": (128, 256, 512, 512), "resolution": 512},
    "small": {"unet": {"sample_size": 8, "cross_attention_dim": 64, "block_out_channels": (32, 64, 64, 64),
                       "attention_head_dim": 8, "norm_num_groups": 16},
              "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 4},
              "vae": (16, 16, 32, 32), "resolution": 64},
}  # fmt: skip


def write_model(folder: Path, tiny: bool = False, size: str = "sd15") -> Path:
    """A diffusers folder with SD1.5's architecture (UNet, CLIP text encoder, VAE) and random weights at
    ``size`` (``sd15`` or ``small``, see :data:`SIZES`); or the embedded default with ``tiny``. The tokenizer
    is mole's small BPE one: the token ids fit CLIP's vocabulary."""
    from mole.tiny import init_tiny_model
    from mole.tokenizer import write_tokenizer

    if tiny:
        return init_tiny_model(folder, overwrite=True)
    import tempfile

    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    spec = SIZES[size]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(tmp))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**spec["unet"])
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408, max_position_embeddings=77, projection_dim=spec["text"]["hidden_size"],
            hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **spec["text"],
        )
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=spec["vae"], down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
        sample_size=spec["resolution"], norm_num_groups=min(32, spec["vae"][0]),
    )  # fmt: skip
    # SD1.5's training schedule (diffusers 0.42's DDPMScheduler has no set_alpha_to_one: that is DDIM's).
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, steps_offset=1, prediction_type="epsilon",
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


#: The stages' sections of configs/paper.yaml (the expert stage trains the face expert's recipe).
SECTIONS = {"stage1": "stage1", "expert": "experts.face", "gates": "gates"}


def run_mole(args: argparse.Namespace) -> dict[str, Any]:
    """One stage through :func:`mole.train.train_stage` with configs/paper.yaml's settings (its speed switches
    included), at this run's resolution, steps and micro-batch; ``--set`` overrides anything."""
    from bench.common import window_throughput
    from mole.train import load_config, train_stage
    from mole.train.config import parse_overrides

    section = SECTIONS[args.stage]
    overrides: dict[str, Any] = {
        "model.resolution": args.resolution,
        f"{section}.max_steps": args.steps,
        f"{section}.batch_size": args.batch,
        f"{section}.grad_accum": 1,
        f"{section}.log_every": LOG_EVERY,
        f"{section}.checkpoint_every": args.steps,
        f"{section}.validation_prompts": [],
        f"{section}.validation_every": None,
    }
    if args.smoke:  # the plumbing on CPU: fp32, no loader workers
        overrides.update({f"{section}.mixed_precision": "no", f"{section}.num_workers": 0})
    overrides.update(parse_overrides(args.set))
    recipe = load_config(PAPER, overrides)
    kwargs: dict[str, Any] = {"expert_name": "face"} if args.stage == "expert" else {}
    if args.stage == "gates":
        kwargs["experts"] = dict(item.split("=", 1) for item in args.experts)
    train_stage(args.stage, recipe, output=args.output, data=str(args.data), base=str(args.model), **kwargs)
    info = json.loads((Path(args.output) / "result.json").read_text(encoding="utf-8"))
    return {
        **window_throughput(Path(args.output) / "metrics.jsonl"),
        "zero_stage": info.get("zero_stage"),
        "compute_dtype": info.get("compute_dtype"),
        "batch_size": args.batch,
        "overrides": {k: v for k, v in overrides.items() if not k.startswith("model.")},
    }


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
        "batch_size": args.batch,
        "compute_dtype": str(next(unet.parameters()).dtype).removeprefix("torch."),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--which", choices=["mole", "plain"], required=True)
    parser.add_argument("--stage", choices=sorted(SECTIONS), default="stage1", help="with --which mole")
    parser.add_argument("--set", action="append", default=[], help="config override for mole (section.key=value)")
    parser.add_argument("--experts", nargs="*", default=[], help="NAME=PATH for the gates stage")
    parser.add_argument("--size", choices=sorted(SIZES), default="sd15", help="resolution of this size")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, fp32")
    args = parser.parse_args()
    args.resolution = 64 if args.smoke else SIZES[args.size]["resolution"]
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
