"""OpenAI-CLIP-layout checkpoints (HPS v1's ``hpc.pt``, HPS v2's open_clip ViT-H-14) in transformers' ``CLIPModel``.

The ``clip`` and ``open_clip`` packages cannot be used here: open_clip imports torchvision, which does not import
beside this torch. Both packages store a CLIP as ``visual.*`` (the image tower), the text tower at the top level
(``token_embedding``, ``transformer.resblocks.*``, ``ln_final``...), fused attention projections
(``attn.in_proj_weight`` = q, k, v stacked) and projections applied as ``x @ proj``. transformers splits q/k/v,
stores projections as ``nn.Linear`` weights (transposed) and names the layer norms differently. The converters
below map one layout to the other tensor for tensor, and :func:`clip_config_from_openai` reads the architecture
from the tensor shapes the way ``clip.model.build_model`` does.
"""

from __future__ import annotations

import gzip
import html
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mole.evaluate.scorers._common import empty_init, load_state_dict
from mole.tokenizer import bytes_to_unicode

logger = logging.getLogger(__name__)

#: Top-level (non-block) tensors: OpenAI name -> (transformers name, stored transposed in transformers).
_TOP_LEVEL: dict[str, tuple[str, bool]] = {
    "visual.class_embedding": ("vision_model.embeddings.class_embedding", False),
    "visual.conv1.weight": ("vision_model.embeddings.patch_embedding.weight", False),
    "visual.positional_embedding": ("vision_model.embeddings.position_embedding.weight", False),
    "visual.ln_pre.weight": ("vision_model.pre_layrnorm.weight", False),  # sic: transformers' spelling
    "visual.ln_pre.bias": ("vision_model.pre_layrnorm.bias", False),
    "visual.ln_post.weight": ("vision_model.post_layernorm.weight", False),
    "visual.ln_post.bias": ("vision_model.post_layernorm.bias", False),
    "visual.proj": ("visual_projection.weight", True),
    "token_embedding.weight": ("text_model.embeddings.token_embedding.weight", False),
    "positional_embedding": ("text_model.embeddings.position_embedding.weight", False),
    "ln_final.weight": ("text_model.final_layer_norm.weight", False),
    "ln_final.bias": ("text_model.final_layer_norm.bias", False),
    "text_projection": ("text_projection.weight", True),
    "logit_scale": ("logit_scale", False),
}
_TOP_LEVEL_INV = {hf: (oa, t) for oa, (hf, t) in _TOP_LEVEL.items()}

#: Residual-block tensors other than the fused q/k/v: OpenAI suffix -> transformers suffix.
_BLOCK: dict[str, str] = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
}
_BLOCK_INV = {hf: oa for oa, hf in _BLOCK.items()}

#: Entries of OpenAI/open_clip state dicts that are not weights: JIT metadata and the causal-mask buffer.
_NOT_WEIGHTS = frozenset({"input_resolution", "context_length", "vocab_size", "attn_mask"})

_OA_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)$")
_QKV = ("q_proj", "k_proj", "v_proj")


def openai_to_transformers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and reshape an OpenAI-layout CLIP state dict into ``CLIPModel``'s layout.

    Raises:
        ValueError: If a tensor has no counterpart (e.g. a ResNet image tower, a SigLIP bias), naming it.
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        if key in _NOT_WEIGHTS:
            continue
        if key in _TOP_LEVEL:
            name, transpose = _TOP_LEVEL[key]
            out[name] = value.t().contiguous() if transpose else value
            continue
        match = _OA_BLOCK.match(key)
        if match is None:
            unknown.append(key)
            continue
        tower = "vision_model" if match.group(1) else "text_model"
        prefix = f"{tower}.encoder.layers.{match.group(2)}."
        suffix = match.group(3)
        if suffix in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = "weight" if suffix.endswith("weight") else "bias"
            for proj, part in zip(_QKV, value.chunk(3, dim=0), strict=True):
                out[f"{prefix}self_attn.{proj}.{kind}"] = part.contiguous()
        elif suffix in _BLOCK:
            out[prefix + _BLOCK[suffix]] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not an OpenAI-layout ViT CLIP: {len(unknown)} unknown tensors, e.g. {sorted(unknown)[:8]}")
    return out


def transformers_to_openai(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`openai_to_transformers` (for tests, and to export to the ``clip`` package)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            continue
        if key in _TOP_LEVEL_INV:
            name, transpose = _TOP_LEVEL_INV[key]
            out[name] = value.t().contiguous() if transpose else value
            continue
        match = _HF_BLOCK.match(key)
        if match is None:
            unknown.append(key)
            continue
        tower, index, suffix = match.groups()
        prefix = f"{'visual.' if tower == 'vision_model' else ''}transformer.resblocks.{index}."
        proj, _, kind = suffix.removeprefix("self_attn.").partition(".")
        if suffix.startswith("self_attn.") and proj in _QKV:
            qkv.setdefault((prefix, kind), {})[proj] = value
        elif suffix in _BLOCK_INV:
            out[prefix + _BLOCK_INV[suffix]] = value
        else:
            unknown.append(key)
    for (prefix, kind), parts in qkv.items():
        if set(parts) != set(_QKV):
            raise ValueError(f"{prefix}: q/k/v {kind} incomplete, have {sorted(parts)}")
        out[f"{prefix}attn.in_proj_{kind}"] = torch.cat([parts[p] for p in _QKV], dim=0)
    if unknown:
        raise ValueError(f"not a transformers CLIPModel state dict: unknown tensors {sorted(unknown)[:8]}")
    return out


def _count_blocks(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
    indices = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    if not indices or indices != set(range(len(indices))):
        raise ValueError(f"OpenAI-layout CLIP state dict has no contiguous {prefix}transformer.resblocks.*")
    return len(indices)


def clip_config_from_openai(
    state_dict: Mapping[str, torch.Tensor],
    *,
    vision_head_width: int = 64,
    text_head_width: int = 64,
    hidden_act: str = "quick_gelu",
    eos_token_id: int = 49407,
    bos_token_id: int = 49406,
    pad_token_id: int = 49407,
) -> Any:  # -> transformers.CLIPConfig
    """The ``CLIPConfig`` of an OpenAI-layout ViT CLIP, read from its tensor shapes.

    Head counts are not stored in a state dict: OpenAI's CLIPs use 64-wide heads (``build_model``), open_clip's
    ViT-H-14 uses 80-wide image heads. OpenAI's CLIPs use QuickGELU; open_clip's LAION models use exact GELU.

    Args:
        state_dict: The OpenAI-layout tensors.
        vision_head_width: Width of one attention head of the image tower.
        text_head_width: Width of one attention head of the text tower.
        hidden_act: ``"quick_gelu"`` (OpenAI) or ``"gelu"`` (open_clip LAION models).
        eos_token_id: The tokenizer's end-of-text id; the text feature is taken at its first position.
        bos_token_id: The tokenizer's start-of-text id.
        pad_token_id: The tokenizer's padding id.
    """
    from transformers import CLIPConfig

    missing = [
        k for k in ("visual.conv1.weight", "visual.proj", "text_projection", "ln_final.weight") if k not in state_dict
    ]
    if missing:
        raise ValueError(f"not an OpenAI-layout ViT CLIP state dict: missing {missing}")
    conv = state_dict["visual.conv1.weight"]
    vision_width, patch = conv.shape[0], conv.shape[-1]
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = state_dict["ln_final.weight"].shape[0]
    embed_dim = state_dict["text_projection"].shape[1]
    for width, head, tower in ((vision_width, vision_head_width, "image"), (text_width, text_head_width, "text")):
        if width % head:
            raise ValueError(f"{tower} tower width {width} is not a multiple of the head width {head}")
    vision = {
        "hidden_size": vision_width,
        "intermediate_size": state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": _count_blocks(state_dict, "visual."),
        "num_attention_heads": vision_width // vision_head_width,
        "image_size": patch * grid,
        "patch_size": patch,
        "hidden_act": hidden_act,
        "layer_norm_eps": 1e-5,
        "projection_dim": embed_dim,
    }
    text = {
        "vocab_size": state_dict["token_embedding.weight"].shape[0],
        "hidden_size": text_width,
        "intermediate_size": state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": _count_blocks(state_dict, ""),
        "num_attention_heads": text_width // text_head_width,
        "max_position_embeddings": state_dict["positional_embedding"].shape[0],
        "hidden_act": hidden_act,
        "layer_norm_eps": 1e-5,
        "projection_dim": embed_dim,
        "eos_token_id": eos_token_id,
        "bos_token_id": bos_token_id,
        "pad_token_id": pad_token_id,
    }
    logit_scale = state_dict.get("logit_scale")
    return CLIPConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=embed_dim,
        logit_scale_init_value=float(logit_scale) if logit_scale is not None else 2.6592,
    )


def load_openai_clip(
    path: str | os.PathLike[str],
    *,
    tokenizer: Any | None = None,
    vision_head_width: int = 64,
    text_head_width: int = 64,
    hidden_act: str = "quick_gelu",
    trust_pickle: bool = False,
    scorer: str = "",
) -> Any:  # -> transformers.CLIPModel
    """A float32 ``CLIPModel`` (eval mode, CPU) from an OpenAI/open_clip-layout checkpoint file.

    Every tensor of the file must land in the model and every weight of the model must come from the file
    (strict loading), so a checkpoint of another architecture fails instead of scoring with random weights.

    Args:
        path: ``.pt``/``.pth``/``.bin`` (optionally wrapped in ``{"state_dict": ...}``) or ``.safetensors``.
        tokenizer: The tokenizer the model will be fed; its special-token ids go into the config.
        vision_head_width: See :func:`clip_config_from_openai`.
        text_head_width: See :func:`clip_config_from_openai`.
        hidden_act: See :func:`clip_config_from_openai`.
        trust_pickle: Unpickle arbitrary objects (only for files you trust).
        scorer: The calling scorer's name, for messages.
    """
    from transformers import CLIPModel

    openai_sd = load_state_dict(Path(path), trust_pickle=trust_pickle, scorer=scorer)
    ids = {}
    if tokenizer is not None:
        ids = {"eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
               "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
        ids = {k: v for k, v in ids.items() if v is not None}
    config = clip_config_from_openai(
        openai_sd, vision_head_width=vision_head_width, text_head_width=text_head_width, hidden_act=hidden_act, **ids
    )
    hf_sd = {k: v.float() for k, v in openai_to_transformers(openai_sd).items()}
    with empty_init():
        model = CLIPModel(config)
    model.load_state_dict(hf_sd, strict=True)
    logger.info(
        "loaded %s: ViT %dx%d/%d, %d+%d layers, embed %d",
        Path(path).name, config.vision_config.image_size, config.vision_config.image_size,
        config.vision_config.patch_size, config.vision_config.num_hidden_layers,
        config.text_config.num_hidden_layers, config.projection_dim,
    )  # fmt: skip
    return model.eval()


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------


def clip_vocab_from_bpe(path: str | os.PathLike[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocab and merges from the ``bpe_simple_vocab_16e6.txt.gz`` shipped in the clip/open_clip packages.

    Mirrors ``SimpleTokenizer.__init__``: bytes, bytes + ``</w>``, the first 48,894 merges, the two specials.
    """
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1] if line.strip()]
    if any(len(m) != 2 for m in merges):
        raise ValueError(f"{path} is not a CLIP BPE merges file")
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, merges  # type: ignore[return-value]


def load_clip_tokenizer(path: str | os.PathLike[str]) -> Any:  # -> transformers.CLIPTokenizer
    """A ``CLIPTokenizer`` from a tokenizer folder (``vocab.json`` + ``merges.txt`` or ``tokenizer.json``, e.g. the
    ``tokenizer`` files of ``openai/clip-vit-large-patch14``) or from CLIP's ``bpe_simple_vocab_16e6.txt.gz``."""
    from transformers import CLIPTokenizer

    path = Path(path)
    if path.is_file() and path.name.endswith(".gz"):
        vocab, merges = clip_vocab_from_bpe(path)
        # CLIP pads with id 0, this pads with <|endoftext|>: the text feature is read at the first
        # <|endoftext|> of a causal encoder, so what follows it never matters.
        return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    if not path.is_dir():
        raise FileNotFoundError(f"CLIP tokenizer not found: {path} (a folder with vocab.json + merges.txt, or "
                                "bpe_simple_vocab_16e6.txt.gz)")  # fmt: skip
    if (
        not ((path / "vocab.json").is_file() and (path / "merges.txt").is_file())
        and not (path / "tokenizer.json").is_file()
    ):
        raise FileNotFoundError(f"CLIP tokenizer folder {path} has neither vocab.json + merges.txt nor tokenizer.json")
    return CLIPTokenizer.from_pretrained(path, local_files_only=True)


def clean_clip_text(text: str) -> str:
    """The text cleaning of CLIP's ``SimpleTokenizer`` without ftfy: HTML entities decoded twice, whitespace
    collapsed (the tokenizer itself lower-cases)."""
    return " ".join(html.unescape(html.unescape(text)).split())
