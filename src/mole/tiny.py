"""The embedded default: a tiny Stable Diffusion 1.x model built from configs, offline.

Every part has the SD1.5 architecture (a cross-attention UNet whose transformer blocks use 1×1 conv
``proj_in``/``proj_out``, an 8× down-sampling VAE, a CLIP text encoder with a real byte-level BPE
tokenizer, the SD1.5 noise schedule) at a size that runs a 64×64 image in a fraction of a second on a
laptop CPU. Nothing is downloaded: UNet and text encoder come from a seeded random init and the tokenizer's
vocabulary is written by this module. The VAE is trained on the synthetic kinds and ships with the package
(:mod:`mole.tiny_vae`): a random one decodes whatever the UNet learns to noise. The result is a standard
diffusers folder, so the rest of the system (and plain ``diffusers.StableDiffusionPipeline.from_pretrained``)
treats it like SD1.5.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from mole.tokenizer import write_tokenizer

logger = logging.getLogger(__name__)

#: Native resolution of the tiny model (pixels). Latents are 8× smaller, as in SD1.5.
TINY_RESOLUTION = 64


def build_tiny_pipeline(
    seed: int = 0, vae_weights: str | os.PathLike[str] | None = None
):  # -> diffusers.StableDiffusionPipeline
    """Build the tiny SD1.x pipeline in memory, deterministically from ``seed``.

    The UNet and text encoder are seeded random inits (what the stages train); the VAE is the trained one shipped
    with the package (:mod:`mole.tiny_vae`), or ``vae_weights`` when given (a file of ``mole tiny vae``).

    Returns:
        A ``diffusers.StableDiffusionPipeline`` in float32 on CPU, without a safety checker.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from mole.tiny_vae import load_shipped_vae, vae_config

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(tmp))
    vocab_size = len(tokenizer)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # SD1.5's UNet shape in miniature: cross-attention down/up blocks, a cross-attention mid block,
        # conv proj_in/proj_out (use_linear_projection=False), 8-dim heads.
        unet = UNet2DConditionModel(
            sample_size=TINY_RESOLUTION // 8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
            use_linear_projection=False,
        )
        vae = AutoencoderKL(**vae_config())
        # Trained on the synthetic kinds (mole.tiny_vae): a random VAE decodes everything the UNet learns to noise.
        load_shipped_vae(vae, vae_weights)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=vocab_size,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                projection_dim=32,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    # The SD1.5 noise schedule and sampler settings.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    for module in (unet, vae, text_encoder):
        module.eval()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def init_tiny_model(
    output: str | os.PathLike[str], seed: int = 0, overwrite: bool = False,
    vae_weights: str | os.PathLike[str] | None = None,
) -> Path:  # fmt: skip
    """Write the tiny pipeline as a standard diffusers folder.

    Args:
        output: Folder to create. It must not already hold a model unless ``overwrite`` is set.
        seed: Seed of the random initialisation; the same seed gives bit-identical weights.
        overwrite: Replace an existing model folder.
        vae_weights: Trained VAE weights of ``mole tiny vae`` (default: the ones shipped with the package).

    Returns:
        The folder path.
    """
    output = Path(output)
    if (output / "model_index.json").exists() and not overwrite:
        raise FileExistsError(f"{output} already holds a model (model_index.json); pass overwrite to replace it")
    pipe = build_tiny_pipeline(seed=seed, vae_weights=vae_weights)
    pipe.save_pretrained(output, safe_serialization=True)
    logger.info("wrote tiny Stable Diffusion model to %s", output)
    return output


#: Defaults of the tiny CLIP's contrastive training on synthetic pairs (about 20 s on 2 CPU cores).
CLIP_TRAIN_STEPS = 250
CLIP_SAMPLES_PER_KIND = 96
#: Seeds of the synthetic pairs it trains and is checked on: apart from the seeds that `mole tiny data`,
#: the scripts and the tests draw (0, 1, ...), so it is not scored on its own training pairs.
_CLIP_TRAIN_SEED, _CLIP_CHECK_SEED = 10_000, 10_001


def init_tiny_clip(
    output: str | os.PathLike[str],
    seed: int = 5,
    overwrite: bool = False,
    train_steps: int = CLIP_TRAIN_STEPS,
    samples_per_kind: int = CLIP_SAMPLES_PER_KIND,
) -> Path:
    """Write a tiny ``transformers`` CLIP model (text + vision towers, processor) for the CLIP-score scorer on the
    embedded default (``mole evaluate run --scorers clip``).

    With ``train_steps > 0`` (the default) it is trained contrastively (CLIP's own loss) on synthetic
    image–caption pairs of every kind of :mod:`mole.data.synthetic`, so that its score says whether an image
    shows what its caption says, as a real CLIP's does for real photos: on held-out pairs the matched cosine is
    far above the mismatched one and caption retrieval is far above chance (the numbers are logged and written
    to ``OUTPUT/tiny_clip.json``). With ``train_steps=0`` it stays randomly initialised: the code path is real
    but the scores are meaningless (a random CLIP's cosines often all fall below 0, which CLIP score clips to 0).
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    if train_steps < 0 or samples_per_kind < 1:
        raise ValueError(f"train_steps must be >= 0 and samples_per_kind >= 1, got {train_steps}, {samples_per_kind}")
    output = Path(output)
    if (output / "config.json").exists() and not overwrite:
        raise FileExistsError(f"{output} already holds a model (config.json); pass overwrite to replace it")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(tmp))
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    text = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 77, "projection_dim": 32, **ids}  # fmt: skip
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8, "projection_dim": 32}  # fmt: skip
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()
        report = {"train_steps": train_steps, "samples_per_kind": samples_per_kind, "seed": seed}
        if train_steps:
            report.update(_train_tiny_clip(model, processor, train_steps, samples_per_kind))
    model.save_pretrained(output, safe_serialization=True)
    processor.save_pretrained(output)
    (output / "tiny_clip.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote tiny CLIP scorer model to %s", output)
    return output


def _synthetic_batch(processor, per_kind: int, seed: int) -> dict:
    """``per_kind`` synthetic image–caption pairs of every kind, interleaved, encoded by the CLIP ``processor``."""
    from mole.data.synthetic import KINDS, generate

    draws = [generate(kind, per_kind, seed=seed, size=TINY_RESOLUTION) for kind in KINDS]
    pairs = [next(draw)[:2] for _ in range(per_kind) for draw in draws]
    images, captions = [image for image, _ in pairs], [caption for _, caption in pairs]
    return processor(text=captions, images=images, return_tensors="pt", padding=True, truncation=True, max_length=77)


def _train_tiny_clip(model, processor, steps: int, per_kind: int) -> dict:
    """Train ``model`` in place with CLIP's contrastive loss on synthetic pairs; check it on held-out ones.

    Returns the final training loss and, on held-out pairs, the mean cosine of matched and of mismatched pairs
    and the top-1 image→caption retrieval accuracy beside its chance level.
    """
    batch = _synthetic_batch(processor, per_kind, _CLIP_TRAIN_SEED)
    order = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    model.train()
    total = len(batch["input_ids"])
    size, loss = min(64, total), None
    for _ in range(steps):
        # Sampled without replacement within a batch: a caption twice in one batch would be its own negative.
        pick = torch.randperm(total, generator=order)[:size]
        out = model(input_ids=batch["input_ids"][pick], attention_mask=batch["attention_mask"][pick],
                    pixel_values=batch["pixel_values"][pick], return_loss=True)  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        loss = out.loss.item()
    model.eval()
    with torch.no_grad():
        out = model(**_synthetic_batch(processor, 16, _CLIP_CHECK_SEED))
    img = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
    txt = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
    cos = img @ txt.T
    n = cos.shape[0]
    result = {
        "final_loss": round(loss, 4),
        "heldout_pairs": n,
        "heldout_matched_cos": round(cos.diagonal().mean().item(), 4),
        "heldout_mismatched_cos": round(((cos.sum() - cos.diagonal().sum()) / (n * n - n)).item(), 4),
        "heldout_top1": round((cos.argmax(dim=1) == torch.arange(n)).float().mean().item(), 4),
        "heldout_top1_chance": round(1 / n, 4),
    }
    logger.info(
        "tiny CLIP trained %d steps on %d synthetic pairs: held-out matched cos %.3f vs mismatched %.3f, "
        "top-1 retrieval %.2f (chance %.3f)", steps, total, result["heldout_matched_cos"],
        result["heldout_mismatched_cos"], result["heldout_top1"], result["heldout_top1_chance"],
    )  # fmt: skip
    return result
