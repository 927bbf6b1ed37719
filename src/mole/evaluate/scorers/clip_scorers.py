"""CLIP-based scorers: CLIP score, HPS v1 (CLIP ViT-L/14 fine-tuned) and HPS v2 / v2.1 (open_clip ViT-H-14)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from mole.evaluate.scorers._common import (
    BatchedScorer,
    clip_preprocess,
    config_path,
    require_files,
    resolve_batch_size,
    resolve_device,
    resolve_dtype,
)
from mole.evaluate.scorers.openai_clip import clean_clip_text, load_clip_tokenizer, load_openai_clip

logger = logging.getLogger(__name__)

#: Weight files of a transformers model folder; any one will do.
_HF_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _pooled(output: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4 and an output with ``pooler_output`` in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _cosine(
    model: Any, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    image = _pooled(model.get_image_features(pixel_values=pixel_values))
    text = _pooled(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
    return (F.normalize(image.float(), dim=-1) * F.normalize(text.float(), dim=-1)).sum(-1)


def _load_hf_clip(folder: Path, scorer: str, what: str) -> Any:
    from transformers import CLIPModel

    require_files(folder, ["config.json", _HF_WEIGHTS], scorer, what)
    return CLIPModel.from_pretrained(folder, local_files_only=True).eval()


class ClipScore(BatchedScorer):
    """CLIP score: ``100 × max(cos(image, text), 0)`` (Hessel et al. 2021, as torchmetrics computes it).

    Uses the model's own processor (resize, crop, normalisation and tokenizer from its folder); prompts longer
    than the text tower's context are truncated.
    """

    name = "clip"

    def __init__(self, model_dir: Path, *, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import CLIPProcessor

        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        what = "a transformers CLIP model folder, e.g. a local copy of openai/clip-vit-large-patch14"
        # transformers 5 writes processor_config.json; hub copies of older models have preprocessor_config.json.
        processor_files = ("preprocessor_config.json", "processor_config.json")
        require_files(model_dir, [processor_files, ("tokenizer.json", "vocab.json")], self.name, what)
        self.model = _load_hf_clip(model_dir, self.name, what).to(device=device, dtype=dtype)
        self.processor = CLIPProcessor.from_pretrained(model_dir, local_files_only=True)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        inputs = self.processor(
            text=prompts, images=images, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length
        )
        cos = _cosine(
            self.model,
            inputs["pixel_values"].to(self.device, self.dtype),
            inputs["input_ids"].to(self.device),
            inputs["attention_mask"].to(self.device),
        )
        return 100.0 * cos.clamp(min=0.0)


class HPSScorer(BatchedScorer):
    """Human Preference Score: ``100 × cos(image, text)`` of a CLIP fine-tuned on human choices.

    HPS v1 (Wu et al. 2023, ``hpc.pt``, CLIP ViT-L/14) is what the MoLE paper reports (≈20 for SD v1.5); HPS v2
    and v2.1 (``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``, open_clip ViT-H-14) compute the same cosine,
    which their code returns unscaled (≈0.27) and their leaderboard reports ×100.

    Preprocessing is the released torchvision transform (:func:`clip_preprocess`); prompts are cleaned as CLIP's
    tokenizer does (without ftfy), lower-cased, and truncated to 77 tokens with ``<|endoftext|>`` last, as
    ``clip.tokenize(..., truncate=True)`` in HPS v1's evaluation script.
    """

    def __init__(
        self, name: str, model: Any, tokenizer: Any, *, batch_size: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        self.name = name
        self.model = model.to(device=device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.image_size = int(model.config.vision_config.image_size)
        self.context_length = int(model.config.text_config.max_position_embeddings)
        vocab = int(model.config.text_config.vocab_size)
        if len(tokenizer) > vocab:
            raise ValueError(f"{name}: the tokenizer has {len(tokenizer)} tokens but the model only {vocab}")

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = clip_preprocess(images, self.image_size).to(self.device, self.dtype)
        tokens = self.tokenizer(
            [clean_clip_text(p) for p in prompts],
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )
        cos = _cosine(
            self.model, pixels, tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
        )
        return 100.0 * cos


# --------------------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------------------

_TOKENIZER_WHAT = (
    "the CLIP tokenizer: a folder with vocab.json + merges.txt (e.g. from openai/clip-vit-large-patch14) "
    "or bpe_simple_vocab_16e6.txt.gz from the clip/open_clip package"
)


def build_clip(config: Mapping[str, Any], device: str | torch.device | None) -> ClipScore:
    """Config: ``model`` (transformers CLIP folder), ``batch_size``, ``dtype``, ``device``."""
    model_dir = config_path(
        config, "model", "clip", "a transformers CLIP model folder (config.json, weights, tokenizer, preprocessor)",
        kind="dir",
    )  # fmt: skip
    dev = resolve_device(device, config)
    return ClipScore(
        model_dir, batch_size=resolve_batch_size(config, 32), device=dev, dtype=resolve_dtype(config, dev)
    )


def _build_hps(
    name: str,
    config: Mapping[str, Any],
    device: str | torch.device | None,
    *,
    checkpoint_what: str,
    vision_head_width: int,
    hidden_act: str,
) -> HPSScorer:
    checkpoint = config_path(config, "checkpoint", name, checkpoint_what, kind="any")
    if checkpoint.is_dir():
        model = _load_hf_clip(checkpoint, name, f"a transformers-format folder of {checkpoint_what}")
        tokenizer = load_clip_tokenizer(config_path(config, "tokenizer", name, _TOKENIZER_WHAT, kind="any")
                                        if config.get("tokenizer") else checkpoint)  # fmt: skip
    else:
        tokenizer = load_clip_tokenizer(config_path(config, "tokenizer", name, _TOKENIZER_WHAT, kind="any"))
        model = load_openai_clip(
            checkpoint,
            tokenizer=tokenizer,
            vision_head_width=int(config.get("vision_head_width", vision_head_width)),
            text_head_width=int(config.get("text_head_width", 64)),
            hidden_act=str(config.get("hidden_act", hidden_act)),
            trust_pickle=bool(config.get("trust_pickle", False)),
            scorer=name,
        )
    dev = resolve_device(device, config)
    return HPSScorer(
        name, model, tokenizer, batch_size=resolve_batch_size(config, 16), device=dev, dtype=resolve_dtype(config, dev)
    )


def build_hps_v1(config: Mapping[str, Any], device: str | torch.device | None) -> HPSScorer:
    """Config: ``checkpoint`` (``hpc.pt``, OpenAI CLIP ViT-L/14 layout, or a transformers CLIP folder),
    ``tokenizer``, ``batch_size``, ``dtype``, ``device``, ``trust_pickle``."""
    return _build_hps(
        "hps_v1", config, device,
        checkpoint_what="the HPS v1 checkpoint hpc.pt (OpenAI CLIP ViT-L/14 state dict, github.com/tgxs002/align_sd)",
        vision_head_width=64, hidden_act="quick_gelu",
    )  # fmt: skip


def build_hps_v2(config: Mapping[str, Any], device: str | torch.device | None) -> HPSScorer:
    """Config: ``checkpoint`` (``HPS_v2_compressed.pt`` or ``HPS_v2.1_compressed.pt``, open_clip ViT-H-14 layout),
    ``tokenizer``, ``batch_size``, ``dtype``, ``device``, ``trust_pickle``.

    open_clip itself is not used: it imports torchvision, which cannot be installed beside this torch. Its
    ViT-H-14 has OpenAI CLIP's tensor layout with 80-wide image heads and exact GELU, which transformers'
    ``CLIPModel`` computes as well.
    """
    return _build_hps(
        "hps_v2", config, device,
        checkpoint_what="the HPS v2/v2.1 checkpoint HPS_v2(.1)_compressed.pt (open_clip ViT-H-14 state dict)",
        vision_head_width=80, hidden_act="gelu",
    )  # fmt: skip
