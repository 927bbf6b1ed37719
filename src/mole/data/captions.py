"""Captions: cleanup of captioner boilerplate and truncation to the CLIP limit.

The paper captions with LLaVA, then removes text patterns such as "The image features ...", "showcasing
...", "creating ...", "demonstrating ...", keeps captions within the 77 tokens of SD's CLIP text encoder,
and drops image–text pairs with low CLIP scores (§2.2). The captioner and the CLIP-score filter live in
:mod:`mole.data.captioner`.

Cleaning here is deliberately narrower than the paper's word list: "creating", "giving" or "adding" are
boilerplate in ", creating a serene atmosphere" but content in "a child creating a sand castle" or "a woman
giving a presentation", and a caption that lost its action teaches the model less than one that kept a
mood clause. So a trailing clause is removed only when it follows a comma AND is about the picture or its
mood (or uses an interpretive verb such as "showcasing"); openings are removed only when they name the
picture itself ("The image features", "In this photo, we can see", BLIP's "there is" / "arafed").
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)

CLIP_MAX_TOKENS = 77  # including the start and end tokens

_PICTURE = r"(?:image|picture|photo(?:graph)?|scene|shot|snapshot|frame|illustration|painting|artwork)"
_SHOW_VERBS = (
    r"(?:features|shows|depicts|showcases|displays|presents|captures|contains|portrays|illustrates|highlights|"
    r"reveals|consists of|is of|is showing|is depicting|is featuring|appears to show|appears to be of)"
)
# Openings a captioner puts before the content, tried in order, repeatedly ("The image features a man ...").
_OPENINGS = [
    re.compile(p, re.IGNORECASE)
    for p in (
        r"^(?:caption|description|assistant|answer)\s*:\s*",
        rf"^(?:in|on)\s+(?:this|the)\s+(?:{_PICTURE})\s*,?\s*(?:(?:we|you)\s+can\s+see|there\s+(?:is|are)|I\s+see)?\s*",
        rf"^(?:this|the|an?)\s+(?:{_PICTURE})\s+{_SHOW_VERBS}\s+(?:that\s+)?",
        rf"^(?:this|the)\s+(?:{_PICTURE})\s+is\s+(?=(?:an?|the)\s)",
        rf"^this\s+is\s+(?:an?|the)\s+(?:{_PICTURE})\s+(?:of|showing|that shows|featuring)\s+",
        r"^(?:a\s+)?moment\s+(?:where|when|in which)\s+",
        r"^(?:there\s+(?:is|are)|we\s+can\s+see|you\s+can\s+see|I\s+see|I\s+can\s+see)\s+(?=\S)",
    )
]
# BLIP's LAION artefact ("arafed woman", "araffe man"): the word is noise, the noun after it is content.
_ARAFED = re.compile(r"\b(an?\s+)?ara+f+\w*\b\s*", re.IGNORECASE)
# Words that make a trailing clause about the picture or its mood rather than about what is in it.
_MOOD = re.compile(
    r"\b(?:atmosphere|ambian[ct]e|mood|feel(?:ing)?|sense|vibe|touch|aesthetic|appeal|charm|visual(?:ly)?|"
    r"interest|composition|overall|viewer|image|picture|photo(?:graph)?|scene|setting|environment|backdrop|"
    r"serene|tranquil|peaceful|cozy|inviting|lively|vibrant|dynamic|captivating|striking|harmonious|"
    r"warmth|elegance|sophistication|beauty|depth|contrast|focal point)\b",
    re.IGNORECASE,
)
# Interpretive verbs: after a comma they say what the picture means, not what is in it.
_INTERPRETIVE = (
    r"showcasing|highlighting|emphasi[sz]ing|suggesting|indicating|hinting|conveying|reflecting|evoking|exuding|"
    r"symboli[sz]ing|signifying|accentuating|enhancing|contributing|underscoring|embodying|radiating"
)
# Verbs that may be either: ", creating a serene atmosphere" (mood) vs ", creating a sand castle" (content).
_AMBIGUOUS = r"creating|adding|giving|making|demonstrating|capturing|bringing|providing|offering|setting|lending"
_CLAUSE = re.compile(rf",\s*(?:which|that|and)?\s*(?P<verb>{_INTERPRETIVE}|{_AMBIGUOUS}|adds|creates|gives|makes)\b"
                     r"(?P<rest>[^,.;]*)", re.IGNORECASE)  # fmt: skip
# Whole sentences of mood or commentary after the first ("The overall atmosphere is calm.").
_MOOD_SENTENCE = re.compile(
    rf"^(?:overall\b|the\s+overall\b|the\s+(?:atmosphere|mood|ambiance|vibe)\b|"
    rf"(?:this|the)\s+(?:{_PICTURE})\s+(?:conveys|evokes|creates|captures\s+the\s+(?:essence|spirit|beauty)|"
    rf"gives|exudes|is\s+(?:a\s+)?(?:beautiful|great|perfect|stunning|wonderful))|it\s+(?:is|appears\s+to\s+be)\s+an?\s+"
    rf"(?:serene|peaceful|beautiful|lovely|pleasant|candid)\b)",
    re.IGNORECASE,
)
# First words that are only capitalised because they open the sentence (a name keeps its capital).
_LOWER_FIRST = {
    "a", "an", "the", "two", "three", "four", "five", "six", "several", "some", "many", "one", "this", "these",
    "close-up", "closeup", "portrait", "group", "people", "man", "woman", "person", "girl", "boy", "child",
}  # fmt: skip


def _strip_clauses(sentence: str) -> str:
    def replace(m: re.Match[str]) -> str:
        verb = m.group("verb").lower()
        interpretive = re.fullmatch(_INTERPRETIVE, verb) is not None
        return "" if interpretive or _MOOD.search(m.group("rest")) else m.group(0)

    return _CLAUSE.sub(replace, sentence)


def clean_caption(text: str) -> str:
    """Strip captioner boilerplate and never content; normalise whitespace; keep names' case.

    >>> clean_caption("The image features a man in a black jacket, showcasing his style.")
    'a man in a black jacket'
    >>> clean_caption("A woman giving a presentation to a crowd")
    'a woman giving a presentation to a crowd'
    """
    text = " ".join(text.replace("\n", " ").split()).strip().strip("\"'“”‘’` ")
    text = _ARAFED.sub(lambda m: "a " if m.group(1) or m.start() == 0 else "", text)
    sentences = [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text) if s.strip()]
    kept: list[str] = []
    for k, sentence in enumerate(sentences):
        if k and _MOOD_SENTENCE.match(sentence):
            continue
        if k == 0:
            before = None
            while before != sentence:
                before = sentence
                for pattern in _OPENINGS:
                    sentence = pattern.sub("", sentence, count=1)
        sentence = _strip_clauses(sentence).strip().rstrip(".!").strip(" ,;:")
        if sentence:
            kept.append(sentence)
    text = ". ".join(kept)
    first = text.split(" ", 1)[0]
    if first.lower() in _LOWER_FIRST and (len(first) == 1 or not first.isupper()):
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

            from mole.tokenizer import write_tokenizer

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
