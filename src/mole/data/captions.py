"""Captions: cleanup of captioner boilerplate, truncation to the CLIP limit, a captioner plug-in, CLIP score.

The paper captions with LLaVA, then removes text patterns such as "The image features ...", "showcasing
...", "creating ...", "demonstrating ...", keeps captions within the 77 tokens of SD's CLIP text encoder,
and drops image–text pairs with low CLIP scores (§2.2).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CLIP_MAX_TOKENS = 77  # including the start and end tokens

# Openings a captioner adds before the content ("The image features a man ..." -> "a man ...").
_OPENINGS = re.compile(
    r"^\s*(?:in\s+)?(?:this|the)\s+(?:image|picture|photo(?:graph)?|scene)\s+"
    r"(?:features|shows|depicts|showcases|displays|presents|captures|contains|is of|portrays)\s+(?:that\s+)?",
    re.IGNORECASE,
)
# Trailing clauses that add mood, not content (", creating a serene atmosphere.").
_TRAILING = re.compile(
    r",?\s*(?:showcasing|creating|demonstrating|highlighting|adding|giving|evoking|suggesting|emphasizing)\b[^.]*",
    re.IGNORECASE,
)


def clean_caption(text: str) -> str:
    """Strip captioner boilerplate, keep the first sentence's content, normalise whitespace.

    >>> clean_caption("The image features a man in a black jacket, showcasing his style.")
    'a man in a black jacket'
    """
    text = " ".join(text.replace("\n", " ").split())
    text = _OPENINGS.sub("", text)
    text = _TRAILING.sub("", text)
    text = text.strip().rstrip(".").strip(" ,;:")
    if text[:2].lower() in ("a ", "an") and text[:1].isupper():
        text = text[0].lower() + text[1:]
    return text


class CaptionTruncator:
    """Cut captions to the CLIP limit, at word boundaries, counting with a real CLIP BPE tokenizer.

    Args:
        tokenizer_path: A tokenizer folder (e.g. an SD1.5 model's ``tokenizer/``) for exact counts. Without
            one, mole's embedded BPE tokenizer is used: it knows fewer merges than CLIP's, so it counts at
            least as many tokens as CLIP would and the cut is conservative (never over the limit).
    """

    def __init__(self, tokenizer_path: str | os.PathLike[str] | None = None, max_tokens: int = CLIP_MAX_TOKENS):
        from transformers import CLIPTokenizer

        if tokenizer_path is None:
            import tempfile

            from mole.tiny import write_tokenizer

            with tempfile.TemporaryDirectory() as tmp:
                self.tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(tmp))
        else:
            path = Path(tokenizer_path)
            if not path.is_dir():
                raise FileNotFoundError(f"tokenizer folder not found: {path}")
            self.tokenizer = CLIPTokenizer.from_pretrained(path)
        self.max_tokens = max_tokens

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, truncation=False).input_ids)

    def __call__(self, text: str) -> tuple[str, bool]:
        """Return ``(caption, was_truncated)``."""
        if self.count(text) <= self.max_tokens:
            return text, False
        words = text.split()
        lo, hi = 0, len(words)  # the longest word prefix that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.count(" ".join(words[:mid])) <= self.max_tokens:
                lo = mid
            else:
                hi = mid - 1
        return " ".join(words[:lo]).rstrip(" ,;:"), True


class Captioner:
    """A transformers image-to-text model from a LOCAL path (BLIP, BLIP-2, LLaVA-style), never downloaded."""

    def __init__(self, model_path: str | os.PathLike[str], prompt: str | None = None, max_new_tokens: int = 60):
        from transformers import pipeline

        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"captioner model not found: {path} has no config.json")
        self.pipe = pipeline("image-to-text", model=str(path))
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens

    def __call__(self, image: Any) -> str:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens}
        if self.prompt:
            kwargs["prompt"] = self.prompt
        out = self.pipe(image, **kwargs)
        return str(out[0]["generated_text"]).strip()


class ClipScorer:
    """CLIP score (100 × cosine of image and text embeddings) with a CLIP model from a LOCAL path."""

    def __init__(self, model_path: str | os.PathLike[str], device: str | None = None):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"CLIP model not found: {path} has no config.json")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = CLIPModel.from_pretrained(path).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(path)

    def __call__(self, images: list[Any], texts: list[str]) -> list[float]:
        import torch

        inputs = self.processor(text=texts, images=images, return_tensors="pt", padding=True, truncation=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.no_grad():
            img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
            txt = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return (100.0 * (img * txt).sum(-1)).clamp(min=0).tolist()
