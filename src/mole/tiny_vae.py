"""The tiny model's VAE, trained on the synthetic kinds, so that the embedded default's images mean something.

A random ``AutoencoderKL`` reconstructs the synthetic faces with a mean squared error above the images' own
variance: whatever the UNet learns, every image it generates decodes to noise. This module trains the tiny VAE
(the architecture of :func:`vae_config`) as a near-deterministic autoencoder on freshly drawn synthetic images of
every kind, checks it on other fresh images, and writes its weights. The weights ship with the package
(``mole/assets/tiny_vae.safetensors``, written by ``mole tiny vae --output src/mole/assets/tiny_vae.safetensors``),
so ``mole tiny init``, the tests and the demo load them instead of paying the training again.

How it is trained and why:

* Loss: pixel MSE of ``decode(mean(encode(x)))`` plus a small penalty on the latents' mean square, which keeps
  them near unit scale without the KL term (a KL-regularised posterior would put noise in every training latent
  of the UNet, the very problem the calibration of the random VAE addressed). The posterior's log-variance is
  then set to a constant far below the latents' spread (:data:`VAE_LOGVAR`), as a trained SD VAE's is, and
  ``scaling_factor`` to 1 / the latents' std over synthetic images (how SD's 0.18215 was computed).
* AdamW with a one-cycle schedule (warm-up, cosine decay): the decay is what takes the error well below the
  plateau of a constant learning rate.
* Seeded: the weights' init, the images drawn (PIL, no torch RNG) and the batch order. Bit-identical on one machine
  and thread count; across machines float reductions differ, so the test checks quality, not bytes.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

#: Native resolution of the tiny model (pixels); mirrors :data:`mole.tiny.TINY_RESOLUTION`.
RESOLUTION = 64
#: Log-variance of the trained VAE's posterior: std e^-10 ≈ 4.5e-5, negligible next to the latents' spread.
VAE_LOGVAR = -20.0
#: Where the shipped weights live inside the package.
SHIPPED_WEIGHTS = Path(__file__).parent / "assets" / "tiny_vae.safetensors"

#: Defaults of ``mole tiny vae`` (the shipped weights were made with exactly these).
VAE_TRAIN_STEPS = 4000
VAE_BATCH_SIZE = 16
VAE_LR = 2e-3
VAE_IMAGES_PER_KIND = 1024
VAE_SEED = 0
#: Weight of the latents' mean-square penalty.
_LATENT_PENALTY = 1e-3
#: Seeds of the synthetic images it trains and is checked on: apart from those of `mole tiny data` (0, 1, ...) and
#: of the tiny CLIP (10_000, 10_001).
_TRAIN_SEED, _CHECK_SEED = 20_000, 20_001


def vae_config() -> dict:
    """The tiny VAE's ``AutoencoderKL`` arguments: SD's 8× down-sampling and 4 latent channels, small widths."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (16, 32, 32, 32),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": RESOLUTION,
        "scaling_factor": 1.0,  # replaced by the measured value
    }


def build_vae(seed: int = VAE_SEED):  # -> diffusers.AutoencoderKL
    """A randomly initialised tiny VAE (seeded)."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**vae_config())


def synthetic_pixels(per_kind: int, seed: int) -> torch.Tensor:
    """``per_kind`` synthetic images of every kind as a ``[N, 3, 64, 64]`` tensor in [-1, 1], kinds interleaved."""
    from mole.data.synthetic import KINDS, draw_sample

    images = [draw_sample(kind, i, seed=seed, size=RESOLUTION)[0] for i in range(per_kind) for kind in sorted(KINDS)]
    raw = torch.stack([torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8) for im in images])
    return raw.view(len(images), RESOLUTION, RESOLUTION, 3).permute(0, 3, 1, 2).float() / 127.5 - 1


def reconstruction_quality(vae, pixels: torch.Tensor) -> dict[str, float]:
    """Mean squared error of ``decode(encode(x).mean)`` on ``pixels``, the pixels' variance and their ratio."""
    with torch.no_grad():
        recon = torch.cat([vae.decode(vae.encode(p).latent_dist.mean).sample for p in pixels.split(64)])
    mse = torch.mean((recon.clamp(-1, 1) - pixels) ** 2).item()
    var = pixels.var().item()
    return {"mse": round(mse, 5), "variance": round(var, 5), "mse_over_variance": round(mse / var, 4)}


def _finish(vae, pixels: torch.Tensor) -> float:
    """Fix the posterior's log-variance at :data:`VAE_LOGVAR` and set ``scaling_factor`` to 1 / the latents' std."""
    c = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[c:].zero_()
        vae.quant_conv.bias[c:].fill_(VAE_LOGVAR)
        means = torch.cat([vae.encode(p).latent_dist.mean for p in pixels.split(64)])
    factor = round(1.0 / means.std().item(), 5)
    vae.register_to_config(scaling_factor=factor)
    return factor


def train_vae(
    vae,
    steps: int = VAE_TRAIN_STEPS,
    batch_size: int = VAE_BATCH_SIZE,
    lr: float = VAE_LR,
    per_kind: int = VAE_IMAGES_PER_KIND,
    seed: int = VAE_SEED,
) -> dict:
    """Train ``vae`` in place on synthetic images of every kind; return its report (quality on fresh images).

    Args:
        vae: A tiny ``AutoencoderKL`` (:func:`build_vae`).
        steps: Optimizer steps.
        batch_size: Images per step (random horizontal flips double the images seen).
        lr: Peak learning rate of the one-cycle schedule.
        per_kind: Synthetic training images drawn per kind.
        seed: Seed of the batch order and flips.
    """
    if steps < 1 or batch_size < 1 or per_kind < 1 or not lr > 0:
        raise ValueError(
            f"steps, batch_size, per_kind must be >= 1 and lr > 0, got {steps}, {batch_size}, {per_kind}, {lr}"
        )
    start = time.monotonic()
    train = synthetic_pixels(per_kind, _TRAIN_SEED)
    check = synthetic_pixels(16, _CHECK_SEED)
    logger.info("tiny VAE: %d training images drawn in %.1f s", len(train), time.monotonic() - start)
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:  # linear warm-up, then cosine to 2 % of the peak
        if step < warmup:
            return (step + 1) / warmup
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    vae.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        pick = torch.randint(len(train), (batch_size,), generator=gen)
        x = train[pick]
        flip = torch.rand(batch_size, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        z = vae.encode(x).latent_dist.mean
        loss = torch.mean((vae.decode(z).sample - x) ** 2) + _LATENT_PENALTY * torch.mean(z**2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if (step + 1) % max(1, steps // 10) == 0:
            logger.info("tiny VAE step %d/%d: loss %.4f", step + 1, steps, loss.item())
    vae.eval()
    with torch.no_grad():  # round to the float16 the weights are stored in, so the report measures what ships
        for p in vae.parameters():
            p.copy_(p.to(torch.float16).float())
    factor = _finish(vae, train[:: max(1, len(train) // 256)])
    report = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "images_per_kind": per_kind,
        "seed": seed,
        "final_loss": round(loss.item(), 5),
        "scaling_factor": factor,
        "train_seconds": round(time.monotonic() - start, 1),
        "heldout": reconstruction_quality(vae, check),
    }
    logger.info(
        "tiny VAE trained: held-out MSE %.4f = %.1f %% of the images' variance (%.0f s)",
        report["heldout"]["mse"],
        100 * report["heldout"]["mse_over_variance"],
        report["train_seconds"],
    )
    return report


def load_shipped_vae(vae, weights: str | os.PathLike[str] | None = None) -> None:
    """Load the shipped (or given) trained weights and scaling factor into a VAE built from :func:`vae_config`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(weights) if weights is not None else SHIPPED_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"no trained tiny VAE weights at {path}; write them with `mole tiny vae --output {path}`"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error type for a file that is not safetensors
        raise ValueError(f"{path} is not a safetensors file of `mole tiny vae`: {err}") from err
    if "scaling_factor" not in metadata:
        raise ValueError(f"{path} is not a tiny VAE file of `mole tiny vae` (no scaling_factor in its metadata)")
    missing, unexpected = vae.load_state_dict(load_file(str(path)), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the tiny VAE: missing {missing[:3]}, unexpected {unexpected[:3]}")
    vae.register_to_config(scaling_factor=float(metadata["scaling_factor"]))


def write_vae_weights(output: str | os.PathLike[str], overwrite: bool = False, **train_options) -> dict:
    """Train the tiny VAE (:func:`train_vae`) and write its weights (safetensors, scaling factor in the metadata)
    and report (``OUTPUT`` with ``.json``); return the report."""
    import json

    from safetensors.torch import save_file

    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass overwrite to replace it")
    seed = train_options.get("seed", VAE_SEED)
    vae = build_vae(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        report = train_vae(vae, **train_options)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Stored in float16 to keep the package small (loaded back into float32; train_vae measured that rounding).
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in vae.state_dict().items()}
    save_file(state, str(output), metadata={"scaling_factor": str(vae.config.scaling_factor), "format": "pt"})
    output.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote tiny VAE weights to %s", output)
    return report
