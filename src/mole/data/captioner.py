"""The captioner and the CLIP-score filter of curation: local transformers models, batched, on GPU when present.

transformers 5 removed ``pipeline("image-to-text")`` (its replacement, ``image-text-to-text``, requires a text
prompt and changed keywords), so the captioner drives the model directly: ``AutoProcessor`` +
``AutoModelForImageTextToText`` load every family people caption with (BLIP, BLIP-2, InstructBLIP, LLaVA,
LLaVA-NeXT, Idefics, PaliGemma, Qwen-VL ...), and ``generate`` runs on a batch of images. Chat models (those
whose processor has a chat template) get the prompt as a user turn with the image; plain captioners (BLIP)
get it as a text prefix to continue. Either way the prompt is cut from the answer, so the caption is only
what the model added.

The CLIP-score filter is the evaluation's :class:`~mole.evaluate.scorers.clip_scorers.ClipScore` (one home
for the transformers-4/5 differences of ``get_image_features``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: The prompt the paper gives LLaVA (§2.2); used for chat models when no prompt is configured.
PAPER_PROMPT = "Describe this image in one sentence with details."


def _require_model_folder(path: Path, what: str) -> None:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what} not found: {path} has no config.json (give a local model folder)")


def _device_and_dtype(device: str | None) -> tuple[Any, Any]:
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        return dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return dev, torch.float32


class Captioner:
    """Caption images with a local image-text-to-text model (never downloaded).

    Args:
        model_path: A transformers model folder with its processor (``save_pretrained`` of both).
        prompt: The instruction for chat models (default :data:`PAPER_PROMPT`), or the text prefix a plain
            captioner continues (default none: unconditional captioning).
        max_new_tokens: Length limit of a caption; the 77-token CLIP limit is applied after cleaning.
        batch_size: Images per ``generate`` call.
        device: ``cuda``/``cpu``...; default CUDA when available (bf16, or fp16 without bf16 support).
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        prompt: str | None = None,
        max_new_tokens: int = 60,
        *,
        batch_size: int = 8,
        device: str | None = None,
    ) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
        path = Path(model_path)
        _require_model_folder(path, "captioner model")
        self.device, self.dtype = _device_and_dtype(device)
        try:
            self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=self.dtype)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(
                f"cannot load {path} as an image-text-to-text model with its processor (BLIP, BLIP-2, LLaVA ...): "
                f"{err}"
            ) from err
        self.model = self.model.to(self.device).eval()
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError(f"{path}: the processor has no tokenizer to decode captions with")
        self.chat = getattr(self.processor, "chat_template", None) is not None
        self.prompt = prompt if prompt is not None else (PAPER_PROMPT if self.chat else None)
        if not self.model.config.is_encoder_decoder:
            self.tokenizer.padding_side = "left"  # decoder-only batches generate after the prompt, aligned right
        self.max_new_tokens, self.batch_size = int(max_new_tokens), int(batch_size)
        self.name = path.name

    def _text(self) -> str | None:
        """The prompt as the model takes it: a chat turn with the image, or a prefix with the image token."""
        if self.chat:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt or ""}]}]
            return str(self.processor.apply_chat_template(messages, add_generation_prompt=True))
        image_token = str(getattr(self.processor, "image_token", "") or "")
        # Q-Former processors (BLIP-2, InstructBLIP) put their query tokens in front themselves.
        own_tokens = getattr(self.processor, "num_query_tokens", None) is not None
        if image_token and not own_tokens and (not self.prompt or image_token not in self.prompt):
            return f"{image_token} {self.prompt or ''}".strip()  # LLaVA-style models saved without a template
        return self.prompt

    def _batch(self, images: list[Any]) -> list[str]:
        import torch

        from mole.data.shards import to_rgb

        rgb = [to_rgb(im) for im in images]
        text = self._text()
        if text is None:
            inputs = self.processor(images=rgb, return_tensors="pt")
        else:
            inputs = self.processor(images=rgb, text=[text] * len(rgb), return_tensors="pt", padding=True)
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items() if isinstance(v, torch.Tensor)}  # fmt: skip
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        ids = inputs.get("input_ids")
        if ids is not None and out.shape[1] >= ids.shape[1] and torch.equal(out[:, : ids.shape[1]], ids):
            out = out[:, ids.shape[1] :]  # decoder-only models return the prompt first
            prompts = [""] * len(rgb)
        elif ids is not None:
            prompts = [p.strip() for p in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        else:
            prompts = [""] * len(rgb)
        captions = []
        for decoded, prompt in zip(self.tokenizer.batch_decode(out, skip_special_tokens=True), prompts, strict=True):
            decoded = decoded.strip()
            if prompt and decoded.startswith(prompt):  # BLIP continues its prefix and returns it
                decoded = decoded[len(prompt) :].strip()
            captions.append(decoded)
        return captions

    def caption(self, images: Sequence[Any]) -> list[str]:
        """One caption per image, in order, ``batch_size`` images per ``generate`` call."""
        images = list(images)
        captions: list[str] = []
        for start in range(0, len(images), self.batch_size):
            captions.extend(self._batch(images[start : start + self.batch_size]))
        return captions

    def __call__(self, image: Any) -> str:
        return self.caption([image])[0]


class Precomputed:
    """Stands in for a :class:`Captioner` whose batch call already ran: hands back its answer (or raises its
    error), so :func:`caption_crops` applies the same fallbacks to captions made for several inputs at once."""

    def __init__(self, answer: list[str] | Exception) -> None:
        self.answer = answer

    def caption(self, images: Sequence[Any]) -> list[str]:
        if isinstance(self.answer, Exception):
            raise self.answer
        if len(self.answer) != len(images):
            raise ValueError(f"captioner returned {len(self.answer)} captions for {len(images)} images")
        return list(self.answer)


def caption_crops(
    crops: list[Any],
    *,
    captioner: Captioner | Precomputed | None,
    finish: Callable[[str | None], tuple[str, bool] | None],
    sidecar: str | None,
    default: str | None,
    every_crop: bool,
    label: str = "",
) -> tuple[list[tuple[str, str, bool] | str], str | None]:
    """Curation's caption for each crop: ``(caption, source, truncated)``, or the reason it has none.

    With ``every_crop`` (scenes) and a captioner, each crop is captioned on its own: a 1024² window of a large
    photo shows one part of it. The photo's sidecar caption, then ``default``, stand in for a crop whose
    caption fails or cleans to nothing, and the source says so (``sidecar (fallback)``). Without
    ``every_crop`` (faces, hands) the sidecar caption comes first and the captioner only captions the rest. A
    captioner that raises loses nothing: its error is returned (second value) and the fallbacks apply.

    Args:
        finish: Cleans and truncates a raw caption; None when nothing is left.
    """
    fallback, fallback_source = (sidecar, "sidecar") if sidecar is not None else (default, "default")
    generated: list[str | None] = [None] * len(crops)
    error = None
    called = captioner is not None and bool(crops) and (every_crop or sidecar is None)
    if called and captioner is not None:
        try:
            generated = list(captioner.caption(crops))
        except Exception as err:  # a model failure must not lose the input: fall back, and say why
            logger.warning("%s: captioner failed: %s: %s", label, type(err).__name__, err)
            error = f"captioner error: {type(err).__name__}: {err}"
    out: list[tuple[str, str, bool] | str] = []
    for text in generated:
        done = finish(text)
        if done is not None:
            out.append((done[0], "captioner", done[1]))
            continue
        reason = (error or "captioner: empty caption after cleanup") if called else ""
        done = finish(fallback)
        if done is not None:
            out.append((done[0], f"{fallback_source} (fallback)" if called else fallback_source, done[1]))
        elif fallback is not None and not reason:
            out.append("empty caption after cleanup")
        else:
            out.append(f"no caption ({reason or 'no sidecar, no captioner, no default_caption'})")
    return out, error


class ClipScorer:
    """CLIP score (``100 × max(cos, 0)``) of image–caption pairs with a local transformers CLIP folder.

    Args:
        model_path: A ``CLIPModel`` folder with its processor (tokenizer and image processor).
        device: Default CUDA when available.
        batch_size: Pairs per forward pass.
    """

    def __init__(self, model_path: str | os.PathLike[str], device: str | None = None, batch_size: int = 32) -> None:
        from mole.evaluate.scorers import build_scorer

        path = Path(model_path)
        _require_model_folder(path, "CLIP model")
        dev, _ = _device_and_dtype(device)
        self.scorer = build_scorer("clip", {"model": str(path), "batch_size": batch_size}, device=str(dev))

    def __call__(self, images: list[Any], texts: list[str]) -> list[float]:
        return self.scorer.score(list(images), list(texts))
