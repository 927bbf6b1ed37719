"""ImageReward (Xu et al. 2023): BLIP's ViT image encoder, BLIP's BERT text encoder cross-attending to the image,
and an MLP on the text encoder's first token; rewards normalised by the released mean and std.

The released code (github.com/THUDM/ImageReward) builds ``BLIP_Pretrain(vit="large", image_size=224)`` from
BLIP's own ``vit.py``/``med.py`` and loads ``ImageReward.pt``, whose keys are ``blip.visual_encoder.*``,
``blip.text_encoder.*``, ``blip.vision_proj.*``, ``blip.text_proj.*`` and ``mlp.layers.*``. transformers ports
both BLIP modules: ``BlipTextModel`` is med.py's ``BertModel`` with the same parameter names, and
``BlipVisionModel`` is vit.py's ``VisionTransformer`` under other names (fused ``qkv`` kept). So the released state
dict loads into :class:`ImageRewardModel` strictly after :func:`official_to_mole` renames the image tower.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from mole.evaluate.scorers._common import (
    BatchedScorer,
    clip_preprocess,
    config_path,
    empty_init,
    load_state_dict,
    resolve_batch_size,
    resolve_device,
    resolve_dtype,
)

logger = logging.getLogger(__name__)

#: The released normalisation of the raw MLP output (``ImageReward.mean`` / ``ImageReward.std``).
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
#: The released prompt length: ``tokenizer(prompt, padding="max_length", truncation=True, max_length=35)``.
MAX_TEXT_LENGTH = 35
#: BLIP's ``init_tokenizer``: bert-base-uncased plus a ``[DEC]`` bos token and an ``[ENC]`` special token.
BLIP_EXTRA_TOKENS = ("[DEC]", "[ENC]")
#: Projections of BLIP's contrastive head: in the checkpoint, unused by the reward.
_UNUSED_KEYS = ("vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias")

# Image tower: released (BLIP vit.py, after "blip.visual_encoder.") -> transformers BlipVisionModel.
_VISION_TOP = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VISION_BLOCK = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
                 "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}  # fmt: skip
_VISION_TOP_INV = {v: k for k, v in _VISION_TOP.items()}
_VISION_BLOCK_INV = {v: k for k, v in _VISION_BLOCK.items()}
_OFFICIAL_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
_MOLE_BLOCK = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


class RewardMLP(nn.Module):
    """The released ``MLP(768)``: five linear layers, no activations (the ReLUs are commented out upstream),
    dropout after the first three; ``layers.{0,2,4,6,7}`` hold the weights."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ImageRewardModel(nn.Module):
    """BLIP image and text encoders plus the reward MLP, with the released checkpoint's module names.

    Attributes:
        visual_encoder: ``BlipVisionModel`` (released: BLIP's ViT-L/16 at 224 px, LayerNorm eps 1e-6).
        text_encoder: ``BlipTextModel`` with cross-attention and no pooler (released: ``med_config.json``).
        vision_proj, text_proj: BLIP's contrastive projections, loaded for strictness, unused.
        mlp: :class:`RewardMLP` on the text encoder's hidden size.
    """

    def __init__(self, vision_config: Any, text_config: Any, embed_dim: int = 256) -> None:
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        self.visual_encoder = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.vision_proj = nn.Linear(vision_config.hidden_size, embed_dim)
        self.text_proj = nn.Linear(text_config.hidden_size, embed_dim)
        self.mlp = RewardMLP(text_config.hidden_size)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The normalised reward per pair, float32 ``[N]`` (``ImageReward.score`` for each pair)."""
        image_embeds = self.visual_encoder(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
        ).last_hidden_state
        features = text[:, 0, :].float()
        rewards = self.mlp(features.to(self.mlp.layers[0].weight.dtype)).float().squeeze(-1)
        return (rewards - REWARD_MEAN) / REWARD_STD


# --------------------------------------------------------------------------------------------------------------
# Key mapping
# --------------------------------------------------------------------------------------------------------------


def official_to_mole(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a released ImageReward state dict to :class:`ImageRewardModel`'s names (no tensor changes).

    ``blip.text_encoder.embeddings.position_ids`` (a buffer transformers recomputes) is dropped.

    Raises:
        ValueError: If a tensor has no counterpart, naming it.
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        if key == "blip.text_encoder.embeddings.position_ids":
            continue
        if key.startswith("mlp."):
            out[key] = value
        elif key.startswith(("blip.text_encoder.", "blip.vision_proj.", "blip.text_proj.")):
            out[key.removeprefix("blip.")] = value
        elif key.startswith("blip.visual_encoder."):
            rest = key.removeprefix("blip.visual_encoder.")
            match = _OFFICIAL_BLOCK.match(rest)
            if rest in _VISION_TOP:
                out["visual_encoder." + _VISION_TOP[rest]] = value
            elif match and match.group(2) in _VISION_BLOCK:
                index, module, kind = match.groups()
                out[f"visual_encoder.encoder.layers.{index}.{_VISION_BLOCK[module]}.{kind}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not an ImageReward state dict: {len(unknown)} unknown tensors, e.g. {sorted(unknown)[:8]}")
    return out


def mole_to_official(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`official_to_mole` (for tests, and to hand weights back to the released code)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            continue
        if key.startswith("mlp."):
            out[key] = value
        elif key.startswith(("text_encoder.", "vision_proj.", "text_proj.")):
            out["blip." + key] = value
        elif key.startswith("visual_encoder."):
            rest = key.removeprefix("visual_encoder.")
            match = _MOLE_BLOCK.match(rest)
            if rest in _VISION_TOP_INV:
                out["blip.visual_encoder." + _VISION_TOP_INV[rest]] = value
            elif match and match.group(2) in _VISION_BLOCK_INV:
                index, module, kind = match.groups()
                out[f"blip.visual_encoder.blocks.{index}.{_VISION_BLOCK_INV[module]}.{kind}"] = value
            else:
                raise ValueError(f"no released name for {key}")
        else:
            raise ValueError(f"no released name for {key}")
    return out


# --------------------------------------------------------------------------------------------------------------
# Configs and loading
# --------------------------------------------------------------------------------------------------------------

_MED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "max_position_embeddings")  # fmt: skip


def text_config_from_med(med_config: Mapping[str, Any], encoder_width: int, source: str = "med_config.json") -> Any:
    """``BlipTextConfig`` from BLIP's ``med_config.json``, with ``encoder_width`` set to the image tower's width
    (``BLIP_Pretrain`` overrides the file's value the same way)."""
    from transformers import BlipTextConfig

    missing = [f for f in _MED_FIELDS if f not in med_config]
    if missing:
        raise ValueError(f"{source} lacks the field(s) {missing}")
    if not med_config.get("add_cross_attention", True):
        raise ValueError(f"{source} has add_cross_attention=false; ImageReward's text encoder cross-attends")
    if med_config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{source}: only absolute position embeddings are supported")
    return BlipTextConfig(
        vocab_size=int(med_config["vocab_size"]),
        hidden_size=int(med_config["hidden_size"]),
        encoder_hidden_size=int(encoder_width),
        intermediate_size=int(med_config["intermediate_size"]),
        num_hidden_layers=int(med_config["num_hidden_layers"]),
        num_attention_heads=int(med_config["num_attention_heads"]),
        max_position_embeddings=int(med_config["max_position_embeddings"]),
        hidden_act=str(med_config.get("hidden_act", "gelu")),
        layer_norm_eps=float(med_config.get("layer_norm_eps", 1e-12)),
        hidden_dropout_prob=float(med_config.get("hidden_dropout_prob", 0.0)),
        attention_probs_dropout_prob=float(med_config.get("attention_probs_dropout_prob", 0.0)),
        pad_token_id=int(med_config.get("pad_token_id", 0)),
        # The encoder never reads these; BlipTextConfig's defaults (30522, 102, 2) would not fit a small vocab.
        bos_token_id=med_config.get("bos_token_id"),
        eos_token_id=med_config.get("eos_token_id"),
        sep_token_id=med_config.get("sep_token_id"),
        is_decoder=True,  # in transformers, only decoder layers get the cross-attention med.py always builds
    )


def vision_config_from_state_dict(state_dict: Mapping[str, torch.Tensor], num_heads: int | None = None) -> Any:
    """``BlipVisionConfig`` of the ViT in a state dict in :class:`ImageRewardModel`'s names.

    Head counts are not stored in weights; BLIP's ViTs (base: 12, large: 16) both use 64-wide heads.
    """
    from transformers import BlipVisionConfig

    try:
        patch = state_dict["visual_encoder.embeddings.patch_embedding.weight"]
        positions = state_dict["visual_encoder.embeddings.position_embedding"].shape[1]
        fc1 = state_dict["visual_encoder.encoder.layers.0.mlp.fc1.weight"]
    except KeyError as e:
        raise ValueError(f"ImageReward state dict lacks the image tower tensor {e}") from None
    width, patch_size = patch.shape[0], patch.shape[-1]
    layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"visual_encoder\.encoder\.layers\.(\d+)\.", k))}
    grid = round((positions - 1) ** 0.5)
    if grid * grid != positions - 1:
        raise ValueError(f"ImageReward position embedding has {positions} rows, not 1 + a square grid")
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=fc1.shape[0],
        num_hidden_layers=len(layers),
        num_attention_heads=num_heads or max(1, width // 64),
        image_size=grid * patch_size,
        patch_size=patch_size,
        hidden_act="gelu",
        layer_norm_eps=1e-6,  # BLIP vit.py: partial(nn.LayerNorm, eps=1e-6)
    )


def load_imagereward(
    checkpoint: Path, med_config: Path, *, vision_heads: int | None = None, trust_pickle: bool = False
) -> ImageRewardModel:
    """:class:`ImageRewardModel` (float32, eval, CPU) from ``ImageReward.pt`` and ``med_config.json``."""
    try:
        med = json.loads(med_config.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{med_config} is not valid JSON: {e}") from e
    state = official_to_mole(load_state_dict(checkpoint, trust_pickle=trust_pickle, scorer="imagereward"))
    vision_config = vision_config_from_state_dict(state, vision_heads)
    text_config = text_config_from_med(med, vision_config.hidden_size, str(med_config))
    embed_dim = state["vision_proj.weight"].shape[0] if "vision_proj.weight" in state else 256
    with empty_init():
        model = ImageRewardModel(vision_config, text_config, embed_dim)
    absent = [k for k in _UNUSED_KEYS if k not in state]
    if absent:  # unused by the reward: tolerated, with zeros instead of uninitialised memory
        logger.warning("%s lacks %s (unused by the reward)", checkpoint.name, absent)
        state.update({k: torch.zeros_like(model.state_dict()[k]) for k in absent})
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


def load_blip_tokenizer(path: Path) -> Any:  # -> transformers.BertTokenizer
    """bert-base-uncased's tokenizer from a local folder (or its ``vocab.txt``), plus BLIP's two special tokens."""
    from transformers import BertTokenizer

    folder = path.parent if path.is_file() else path
    if not ((folder / "vocab.txt").is_file() or (folder / "tokenizer.json").is_file()):
        raise FileNotFoundError(
            f"scorer 'imagereward': {folder / 'vocab.txt'} not found (the bert-base-uncased tokenizer BLIP uses)"
        )
    tokenizer = BertTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": BLIP_EXTRA_TOKENS[0]})
    tokenizer.add_special_tokens({"additional_special_tokens": [BLIP_EXTRA_TOKENS[1]]})
    return tokenizer


class ImageRewardScorer(BatchedScorer):
    """ImageReward: the normalised reward of each (image, prompt); the MoLE paper's "IR (%)" is 100 × its mean.

    Preprocessing is the released torchvision transform at the ViT's resolution (224); prompts are tokenized
    to exactly 35 tokens (padded or truncated) as released.
    """

    name = "imagereward"

    def __init__(
        self, model: ImageRewardModel, tokenizer: Any, *, batch_size: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        self.model = model.to(device=device, dtype=dtype).eval()
        self.model.mlp.float()  # the released code runs the MLP on .float() features
        self.tokenizer = tokenizer
        self.image_size = int(model.visual_encoder.config.image_size)
        vocab = int(model.text_encoder.config.vocab_size)
        if len(tokenizer) > vocab:
            raise ValueError(f"imagereward: the tokenizer has {len(tokenizer)} tokens but the model only {vocab}")
        if len(tokenizer) < vocab:
            logger.warning("imagereward: tokenizer has %d tokens, model %d: wrong tokenizer?", len(tokenizer), vocab)

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = clip_preprocess(images, self.image_size).to(self.device, self.dtype)
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH, return_tensors="pt"
        )
        return self.model(pixels, tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))


def build_imagereward(config: Mapping[str, Any], device: str | torch.device | None) -> ImageRewardScorer:
    """Config: ``checkpoint`` (``ImageReward.pt``), ``med_config`` (``med_config.json``), ``tokenizer``
    (bert-base-uncased folder), ``batch_size``, ``dtype``, ``device``, ``trust_pickle``, ``vision_heads``."""
    checkpoint = config_path(config, "checkpoint", "imagereward", "ImageReward.pt (huggingface.co/THUDM/ImageReward)")
    med_config = config_path(
        config, "med_config", "imagereward", "med_config.json, BLIP's BERT config (huggingface.co/THUDM/ImageReward)"
    )
    tokenizer_path = config_path(
        config, "tokenizer", "imagereward", "the bert-base-uncased tokenizer folder (vocab.txt)", kind="any"
    )
    tokenizer = load_blip_tokenizer(tokenizer_path)
    heads = config.get("vision_heads")
    model = load_imagereward(
        checkpoint,
        med_config,
        vision_heads=int(heads) if heads else None,
        trust_pickle=bool(config.get("trust_pickle", False)),
    )
    dev = resolve_device(device, config)
    return ImageRewardScorer(
        model, tokenizer, batch_size=resolve_batch_size(config, 16), device=dev, dtype=resolve_dtype(config, dev)
    )
