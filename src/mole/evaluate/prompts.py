"""The paper's two human-centric prompt benchmarks (§4.1), built from the real upstream files.

*COCO Human Prompts* keeps the COCO Caption val captions that contain a human-related word (the paper gets
about 60k from ``captions_val2014.json``). *DiffusionDB Human Prompts* keeps the DiffusionDB 2M prompts that are
not NSFW by DiffusionDB's own indicators, contain a human-related word and contain no special symbols such as
``[ ] { }`` (the paper gets about 64k). The paper then samples 3k prompts from each, three times.

Every builder counts, per input row, the first rule that rejected it, so a benchmark can be audited: the
counts always satisfy ``input == kept + sum(rejections)``. The word list, the symbol rules and the NSFW
thresholds are documented in ``docs/evaluation.md``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------
# Human words
# --------------------------------------------------------------------------------------------------------------

#: The paper's examples ("woman, man, kid, girl, boy, person, teenager, etc."), the other general words for a
#: human being, and their plurals. Building with only these stays closest to the paper's wording.
CORE_HUMAN_WORDS: tuple[str, ...] = tuple("""
woman women man men kid kids child children girl girls boy boys person persons people teenager teenagers
lady ladies gentleman gentlemen
""".split())  # fmt: skip

#: Words that name a person and, in COCO captions and DiffusionDB prompts, almost never anything else.
#: Ambiguous words are left out on purpose, because a false match puts a prompt without a person into a
#: human-centric benchmark. COCO is full of animals and street scenes: "baby" and "adult" (a baby elephant, an
#: adult giraffe), "mother"/"mom" (a mother bear), "pedestrian" (a pedestrian crossing sign), "tourist" (a tourist
#: bus), "farmer" (a farmers market), "cowboy" (a cowboy hat), "player" (a DVD player), "couple" (a couple of
#: zebras), "family" (a family of ducks), "crowd" (a crowd of birds), "fan" (a ceiling fan), "model" (a model
#: train), "batter" (cake batter), "pitcher" (a water pitcher), "groom" (to groom a horse), "cook" (the verb),
#: "king"/"queen" (a king-size bed, a queen bee), "human" (a human-like robot, a human skull).
EXTRA_HUMAN_WORDS: tuple[str, ...] = tuple("""
guy guys toddler toddlers infant infants teen teens youngster youngsters
father fathers dad dads son sons daughter daughters brother brothers sister sisters husband husbands wife wives
bride brides grandmother grandmothers grandfather grandfathers grandma grandmas grandpa grandpas
boyfriend boyfriends girlfriend girlfriends
businessman businessmen businesswoman businesswomen policeman policemen policewoman policewomen fisherman fishermen
skier skiers surfer surfers skateboarder skateboarders snowboarder snowboarders cyclist cyclists biker bikers
rider riders athlete athletes umpire umpires student students soldier soldiers officer officers chef chefs
doctor doctors nurse nurses worker workers dancer dancers actor actors actress actresses
""".split())  # fmt: skip

#: The default list: :data:`CORE_HUMAN_WORDS` + :data:`EXTRA_HUMAN_WORDS`, matched as whole words in any case.
HUMAN_WORDS: tuple[str, ...] = CORE_HUMAN_WORDS + EXTRA_HUMAN_WORDS


@functools.lru_cache(maxsize=16)
def _human_word_regex(words: tuple[str, ...]) -> re.Pattern[str]:
    if not words:
        raise ValueError("the human word list is empty")
    alternatives = "|".join(re.escape(w.lower()) for w in sorted(set(words), key=len, reverse=True))
    # A word must not touch a letter, digit, underscore or hyphen on either side: "manhattan", "human",
    # "germany", "snowman" and the compounds "man-made", "kid-friendly", "spider-man" do not count as "man"/"kid".
    # An apostrophe is a boundary, so possessives ("woman's", "kids'", "women’s") do count.
    return re.compile(rf"(?<![\w-])(?:{alternatives})(?![\w-])", re.IGNORECASE)


def find_human_words(text: str, words: Iterable[str] = HUMAN_WORDS) -> list[str]:
    """Every human word in ``text`` (lower-cased, in order), e.g. to show why a prompt was kept."""
    return [m.group(0).lower() for m in _human_word_regex(tuple(words)).finditer(text)]


def has_human_word(text: str, words: Iterable[str] = HUMAN_WORDS) -> bool:
    """Whether ``text`` contains one of ``words`` as a whole word (case-insensitive, possessives included).

    >>> has_human_word("A woman's hat"), has_human_word("a map of Manhattan"), has_human_word("a man-made lake")
    (True, False, False)
    """
    return _human_word_regex(tuple(words)).search(text) is not None


# --------------------------------------------------------------------------------------------------------------
# Special symbols
# --------------------------------------------------------------------------------------------------------------

#: Characters that make a DiffusionDB prompt "special": ``[ ]`` and ``{ }`` (named by the paper; prompt-editing
#: and emphasis syntax of web UIs), ``( )`` (emphasis and ``(word:1.3)`` weights, which a plain SD pipeline reads
#: as literal text), ``< >`` (embedding/LoRA tags, HTML), ``|`` (prompt alternation) and ``\\`` (escapes).
SPECIAL_CHARACTERS: frozenset[str] = frozenset("[]{}()<>|\\")

#: Character sequences that make a prompt special: ``::`` (Midjourney-style weights, ``cat::2``) and a
#: command-line flag such as ``--ar 16:9`` or ``--seed 5`` pasted from a bot command.
_SPECIAL_SEQUENCES = re.compile(r"::|(?:^|\s)--[a-z]", re.IGNORECASE)


def has_special_symbols(text: str) -> bool:
    """Whether ``text`` holds a :data:`SPECIAL_CHARACTERS` character, ``::`` or a ``--flag``.

    >>> has_special_symbols("a (beautiful:1.2) woman"), has_special_symbols("a woman, 4k, artstation")
    (True, False)
    """
    return any(c in SPECIAL_CHARACTERS for c in text) or _SPECIAL_SEQUENCES.search(text) is not None


# --------------------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------------------


def normalize_prompt(text: Any) -> str:
    """Collapse every run of whitespace (newlines and tabs included) into one space and strip the ends.

    ``None`` (a missing value in a table) becomes ``""``, which the builders count as ``empty``.
    """
    if text is None:
        return ""
    return " ".join(str(text).split())


def dedup_key(prompt: str) -> str:
    """The key under which two normalised prompts are duplicates: case-folded, without trailing periods.

    COCO annotators write the same caption as "A man riding a horse." and "a man riding a horse"; both
    would generate the same images, so only the first is kept.
    """
    return prompt.casefold().rstrip(" .")


# --------------------------------------------------------------------------------------------------------------
# PromptSet
# --------------------------------------------------------------------------------------------------------------

#: Rejection rules, in the order the DiffusionDB builder applies them (the paper's order: NSFW first, then
#: human words, then special symbols); each rejected row is counted under the first rule that matched.
REJECTION_RULES: tuple[str, ...] = (
    "empty",
    "nsfw_prompt",
    "nsfw_image",
    "no_human_word",
    "special_symbols",
    "duplicate",
)


@dataclass
class PromptSet:
    """A benchmark: the kept prompts in first-seen order and, per rule, how many input rows it rejected.

    Attributes:
        prompts: Normalised prompts, unique under :func:`dedup_key`, without newlines.
        counts: ``input``, every rule of :data:`REJECTION_RULES` and ``kept``.
        source: The file the set was built from.
        params: The builder's settings (thresholds, word list size, ...), written next to the counts so a
            released benchmark says how it was made.
    """

    prompts: list[str]
    counts: dict[str, int]
    source: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.check()

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[str]:
        return iter(self.prompts)

    def check(self) -> None:
        """Raise ``ValueError`` unless the counts add up and the prompts can be written one per line."""
        required = ("input", *REJECTION_RULES, "kept")
        missing = [k for k in required if k not in self.counts]
        if missing:
            raise ValueError(f"PromptSet counts lack {missing}; they need {list(required)}")
        rejected = sum(self.counts[r] for r in REJECTION_RULES)
        if self.counts["input"] != self.counts["kept"] + rejected:
            raise ValueError(
                f"PromptSet counts do not add up: input={self.counts['input']} != kept={self.counts['kept']} "
                f"+ rejected={rejected} ({self.counts})"
            )
        if self.counts["kept"] != len(self.prompts):
            raise ValueError(f"PromptSet counts kept={self.counts['kept']} but holds {len(self.prompts)} prompts")
        for i, p in enumerate(self.prompts):
            if not p or "\n" in p or "\r" in p:
                raise ValueError(f"prompt {i} is empty or spans lines: {p!r}")

    @property
    def stats(self) -> dict[str, Any]:
        """What the sidecar ``<path>.stats.json`` holds."""
        return {"source": self.source, "params": self.params, "counts": dict(self.counts)}

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write one prompt per line (UTF-8, ``\\n``) to ``path`` and the counts to ``<path>.stats.json``.

        Both files are written to a temporary name first and renamed, so a reader never sees half a benchmark.
        """
        self.check()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        stats_path = stats_path_for(path)
        _atomic_write(path, "".join(p + "\n" for p in self.prompts))
        _atomic_write(stats_path, json.dumps(self.stats, indent=2, ensure_ascii=False) + "\n")
        logger.info("wrote %d prompts to %s (counts in %s)", len(self.prompts), path, stats_path)
        return path

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> PromptSet:
        """Read a set written by :meth:`write` (the prompt file and its ``.stats.json`` sidecar)."""
        path = Path(path)
        stats_path = stats_path_for(path)
        for p in (path, stats_path):
            if not p.is_file():
                raise FileNotFoundError(f"prompt set file not found: {p}")
        prompts = path.read_text(encoding="utf-8").splitlines()
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
        if "counts" not in stats:
            raise ValueError(f"{stats_path} has no 'counts' field")
        return cls(prompts, dict(stats["counts"]), stats.get("source", ""), dict(stats.get("params", {})))


def stats_path_for(path: str | os.PathLike[str]) -> Path:
    """``prompts.txt`` -> ``prompts.txt.stats.json``."""
    return Path(f"{os.fspath(path)}.stats.json")


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """The prompts of a file written by :meth:`PromptSet.write` (one per line, no sidecar needed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line]


def _atomic_write(path: Path, text: str) -> None:
    from mole import atomic

    atomic.write_text(path, text)


class _Collector:
    """Applies the rules row by row, in the order the builder calls them, and keeps the counts."""

    def __init__(self, words: Iterable[str]) -> None:
        self.words = tuple(words)
        self.regex = _human_word_regex(self.words)
        self.counts: dict[str, int] = {"input": 0, **{r: 0 for r in REJECTION_RULES}, "kept": 0}
        self.prompts: list[str] = []
        self._seen: set[str] = set()

    def reject(self, rule: str) -> None:
        self.counts["input"] += 1
        self.counts[rule] += 1

    def offer(self, prompt: str, key: str, drop_special_symbols: bool) -> None:
        """Count a non-empty, safe, normalised prompt under the first content rule it fails, or keep it."""
        if self.regex.search(prompt) is None:
            self.reject("no_human_word")
        elif drop_special_symbols and has_special_symbols(prompt):
            self.reject("special_symbols")
        elif key in self._seen:
            self.reject("duplicate")
        else:
            self._seen.add(key)
            self.prompts.append(prompt)
            self.counts["input"] += 1
            self.counts["kept"] += 1

    def result(self, source: Path, params: dict[str, Any]) -> PromptSet:
        params = {**params, "num_human_words": len(self.words)}
        result = PromptSet(self.prompts, self.counts, str(source), params)
        logger.info("%s: %s", source.name, ", ".join(f"{k}={v}" for k, v in self.counts.items()))
        return result


# --------------------------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------------------------


def build_coco_prompts(
    captions_json_path: str | os.PathLike[str],
    *,
    words: Iterable[str] = HUMAN_WORDS,
    drop_special_symbols: bool = False,
) -> PromptSet:
    """COCO Human Prompts: the captions of a COCO captions file that contain a human word.

    Args:
        captions_json_path: A COCO Caption annotation file, e.g. ``annotations/captions_val2014.json`` (the
            paper's "COCO val set": its 202k captions give about 60k human prompts; val2017 has only 25k
            captions). The schema is ``{"images": [...], "annotations": [{"image_id", "id", "caption"}, ...]}``;
            only ``annotations[*].caption`` is read, in file order.
        words: The human word list.
        drop_special_symbols: Also apply the DiffusionDB symbol rule. Off by default: the paper applies it only
            to DiffusionDB, and COCO captions are plain sentences.

    Returns:
        The set; each caption is one input row (rules ``nsfw_prompt``/``nsfw_image`` never fire for COCO).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file is not in the COCO captions schema (names the missing field).
    """
    path = Path(captions_json_path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO captions file not found: {path} (expected e.g. captions_val2014.json)")
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path} is not a COCO captions file: it has no 'annotations' list")
    collector = _Collector(words)
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "caption" not in ann:
            raise ValueError(f"{path}: annotations[{i}] has no 'caption' field")
        prompt = normalize_prompt(ann["caption"])
        if not prompt:
            collector.reject("empty")
            continue
        collector.offer(prompt, dedup_key(prompt), drop_special_symbols)
    params = {"dataset": "coco", "drop_special_symbols": drop_special_symbols}
    return collector.result(path, params)


# --------------------------------------------------------------------------------------------------------------
# DiffusionDB
# --------------------------------------------------------------------------------------------------------------

#: The columns of DiffusionDB's ``metadata.parquet`` / ``metadata-large.parquet`` that the builder reads.
DIFFUSIONDB_COLUMNS: tuple[str, ...] = ("prompt", "prompt_nsfw", "image_nsfw")

#: Default NSFW thresholds: a row is NSFW when its score is above this. Both scores are probabilities from
#: binary classifiers (Detoxify's max of ``toxicity`` and ``sexual_explicit`` for prompts, LAION's NSFW detector
#: for images), so 0.5 is their decision boundary. See :func:`build_diffusiondb_prompts` for values above 1.
DEFAULT_PROMPT_NSFW_MAX = 0.5
DEFAULT_IMAGE_NSFW_MAX = 0.5


def _is_nsfw(score: Any, threshold: float | None) -> bool:
    if threshold is None:
        return False
    if score is None:
        return True  # unknown: a released benchmark cannot vouch for it
    score = float(score)
    # NaN is unknown; DiffusionDB's 2.0 (and any value above 1, which is no probability) means "flagged".
    return math.isnan(score) or score > 1.0 or score > threshold


def _check_threshold(name: str, value: float | None) -> None:
    if value is not None and not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (a probability) or None to disable the filter, got {value}")


def build_diffusiondb_prompts(
    metadata_parquet_path: str | os.PathLike[str],
    *,
    prompt_nsfw_max: float | None = DEFAULT_PROMPT_NSFW_MAX,
    image_nsfw_max: float | None = DEFAULT_IMAGE_NSFW_MAX,
    words: Iterable[str] = HUMAN_WORDS,
    drop_special_symbols: bool = True,
) -> PromptSet:
    """DiffusionDB Human Prompts: safe, plain-text DiffusionDB prompts that contain a human word.

    DiffusionDB has one row per image and several images per prompt. A prompt is NSFW when *any* of its rows
    (same prompt under :func:`dedup_key`) is: one NSFW image is enough to show the prompt can produce one. The
    scores are DiffusionDB's own: ``prompt_nsfw`` (Detoxify, 0–1) and ``image_nsfw`` (LAION's NSFW detector,
    0–1, where DiffusionDB writes 2.0 for images Stable Diffusion's safety checker had already flagged and
    blurred). Any score above 1 therefore counts as flagged whatever the threshold, and a missing or NaN score
    counts as NSFW (unknown cannot be vouched for).

    Args:
        metadata_parquet_path: DiffusionDB's ``metadata.parquet`` (2M, the paper's set) or
            ``metadata-large.parquet``; only the columns ``prompt``, ``prompt_nsfw`` and ``image_nsfw`` are read.
        prompt_nsfw_max: Keep rows whose ``prompt_nsfw`` is at most this; ``None`` disables the rule.
        image_nsfw_max: Keep rows whose ``image_nsfw`` is at most this; ``None`` disables the rule.
        words: The human word list.
        drop_special_symbols: Drop prompts with :func:`has_special_symbols` (the paper does).

    Returns:
        The set; each table row is one input row, counted under the first rule that rejected it, in the order
        ``empty``, ``nsfw_prompt``, ``nsfw_image``, ``no_human_word``, ``special_symbols``, ``duplicate``.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If a required column is missing (names it) or a threshold is not in [0, 1].
    """
    _check_threshold("prompt_nsfw_max", prompt_nsfw_max)
    _check_threshold("image_nsfw_max", image_nsfw_max)
    path = Path(metadata_parquet_path)
    if not path.is_file():
        raise FileNotFoundError(f"DiffusionDB metadata file not found: {path} (expected metadata.parquet)")
    columns = _read_parquet_columns(path, DIFFUSIONDB_COLUMNS)
    raw_prompts, prompt_scores, image_scores = columns["prompt"], columns["prompt_nsfw"], columns["image_nsfw"]

    # Pass 1: normalise, and find the prompts that are NSFW in at least one of their rows.
    prompts = [normalize_prompt(p) for p in raw_prompts]
    keys = [dedup_key(p) for p in prompts]
    nsfw_prompt_keys: set[str] = set()
    nsfw_image_keys: set[str] = set()
    for key, ps, im in zip(keys, prompt_scores, image_scores, strict=True):
        if key:
            if _is_nsfw(ps, prompt_nsfw_max):
                nsfw_prompt_keys.add(key)
            if _is_nsfw(im, image_nsfw_max):
                nsfw_image_keys.add(key)

    # Pass 2: count every row under its first rule, in table order.
    collector = _Collector(words)
    for prompt, key in zip(prompts, keys, strict=True):
        if not prompt:
            collector.reject("empty")
        elif key in nsfw_prompt_keys:
            collector.reject("nsfw_prompt")
        elif key in nsfw_image_keys:
            collector.reject("nsfw_image")
        else:
            collector.offer(prompt, key, drop_special_symbols)
    params = {
        "dataset": "diffusiondb",
        "prompt_nsfw_max": prompt_nsfw_max,
        "image_nsfw_max": image_nsfw_max,
        "drop_special_symbols": drop_special_symbols,
    }
    return collector.result(path, params)


def _read_parquet_columns(path: Path, columns: Sequence[str]) -> dict[str, list[Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow comes with mlflow
        raise ImportError("reading DiffusionDB's metadata.parquet needs the 'pyarrow' package") from e
    names = pq.read_schema(path).names
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"{path} lacks the DiffusionDB column(s) {missing}; it has {names}")
    table = pq.read_table(path, columns=list(columns))
    return {c: table.column(c).to_pylist() for c in columns}


# --------------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------------


def sample_prompts(prompts: Sequence[str], n: int, seed: int, repeat: int) -> list[str]:
    """``n`` distinct prompts (by position) for repeat ``repeat`` of an evaluation, deterministically.

    The paper samples 3k prompts per benchmark and repeats the evaluation three times (``repeat`` = 0, 1, 2).
    Each prompt's rank is the SHA-256 of ``(seed, repeat, prompt)``, so a sample depends on no RNG
    implementation or library version, does not change when the list is reordered, and changes by at most
    the prompts that were added or removed.

    Args:
        prompts: The benchmark's prompts.
        n: How many to draw, without replacement; at most ``len(prompts)``.
        seed: The evaluation's seed.
        repeat: The repeat index; different repeats give (nearly) independent samples.

    Returns:
        The sample, in rank order.
    """
    if not 0 <= n <= len(prompts):
        raise ValueError(f"cannot sample {n} prompts without replacement from {len(prompts)}")

    def rank(item: tuple[int, str]) -> tuple[bytes, int]:
        digest = hashlib.sha256(f"{seed}\x1f{repeat}\x1f{item[1]}".encode()).digest()
        return digest, item[0]  # the position breaks ties between equal prompts

    return [p for _, p in sorted(enumerate(prompts), key=rank)[:n]]


def sample_repeats(prompts: Sequence[str], n: int, seed: int, repeats: int = 3) -> list[list[str]]:
    """The samples of :func:`sample_prompts` for repeats ``0 .. repeats-1`` (the paper: ``n=3000, repeats=3``)."""
    return [sample_prompts(prompts, n, seed, r) for r in range(repeats)]
