"""Prompt benchmarks from files in the real COCO captions and DiffusionDB metadata.parquet schemas."""

from __future__ import annotations

import datetime as dt
import json
import math
import random
from pathlib import Path

import pytest

from mole.evaluate.prompts import (
    CORE_HUMAN_WORDS,
    HUMAN_WORDS,
    REJECTION_RULES,
    PromptSet,
    build_coco_prompts,
    build_diffusiondb_prompts,
    find_human_words,
    has_human_word,
    has_special_symbols,
    read_prompts,
    sample_prompts,
    sample_repeats,
    stats_path_for,
)


def _assert_invariant(result: PromptSet) -> None:
    rejected = sum(result.counts[r] for r in REJECTION_RULES)
    assert result.counts["input"] == result.counts["kept"] + rejected
    assert result.counts["kept"] == len(result.prompts)


# ------------------------------------------------------------------------------------------------------------
# Words and symbols
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["A WOMAN on a bench", "two men", "the kids' toys", "a woman's hat", "women’s shoes", "Children playing",
     "a teenager", "a gentleman and two ladies", "a person", "people at a market", "a little girl.", "boys",
     "a toddler in a crib", "a skier going downhill", "man", "(man)", "a man,", "the PERSONS involved"],
)  # fmt: skip
def test_human_words_match(text: str) -> None:
    assert has_human_word(text)


@pytest.mark.parametrize(
    "text",
    ["Manhattan skyline", "a human skull", "map of Germany", "a snowman", "a man-made lake", "kid-friendly menu",
     "spider-man", "womanhood", "mankind", "a salesmanship award", "a DVD player", "a couple of giraffes",
     "a family of elephants", "a crowd of birds", "old_man", "mannequin", "a baby elephant with its mother",
     "a farmers market", "a pedestrian crossing sign", "a cowboy hat", ""],
)  # fmt: skip
def test_human_words_do_not_match(text: str) -> None:
    assert not has_human_word(text)


def test_word_lists() -> None:
    required = ("woman man kid child girl boy person people teenager lady gentleman women men kids children girls "
                "boys persons teenagers ladies gentlemen").split()  # fmt: skip
    assert set(required) <= set(CORE_HUMAN_WORDS) <= set(HUMAN_WORDS)
    assert len(set(HUMAN_WORDS)) == len(HUMAN_WORDS)  # no word listed twice
    assert all(w == w.lower() and w.isalpha() for w in HUMAN_WORDS)
    assert find_human_words("A Man and his SON met two women") == ["man", "son", "women"]
    assert has_human_word("a son", words=HUMAN_WORDS) and not has_human_word("a son", words=CORE_HUMAN_WORDS)


@pytest.mark.parametrize(
    ("text", "special"),
    [("a [woman] in red", True), ("a {man}", True), ("a (beautiful:1.2) woman", True), ("girl | boy", True),
     ("a <lora:face:1> woman", True), ("cat::2 woman", True), ("a woman --ar 16:9", True), ("a man \\ woman", True),
     ("a woman, 4k, artstation, by greg rutkowski", False), ("a 10:30 train and a man", False),
     ("a well-lit portrait of a man", False), ("a woman's face!", False)],
)  # fmt: skip
def test_special_symbols(text: str, special: bool) -> None:
    assert has_special_symbols(text) is special


# ------------------------------------------------------------------------------------------------------------
# COCO
# ------------------------------------------------------------------------------------------------------------


def _write_coco(path: Path, captions: list[str | None]) -> Path:
    """The real captions_val2014.json layout (info, images, licenses, annotations)."""
    data = {
        "info": {"description": "COCO 2014 Dataset", "year": 2014},
        "images": [
            {"id": 100 + i, "file_name": f"COCO_val2014_{100 + i:012d}.jpg", "height": 480, "width": 640}
            for i in range(len(captions))
        ],
        "licenses": [{"id": 1, "name": "Attribution-NonCommercial-ShareAlike License"}],
        "annotations": [{"image_id": 100 + i, "id": 9000 + i, "caption": c} for i, c in enumerate(captions)],
    }
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_build_coco_prompts(tmp_path: Path) -> None:
    path = _write_coco(tmp_path / "captions_val2014.json", [
        "A man riding a wave on top of a surfboard.\n",
        "A giraffe standing next to a tree.",
        "a man riding a wave on top of a surfboard",  # duplicate: case, period, whitespace
        "   ",
        "Two  women\tsitting on a bench (outdoors).",
        "A view of Manhattan from a man-made island.",
        "A little girl's birthday cake",
        "",
    ])  # fmt: skip
    result = build_coco_prompts(path)
    assert result.prompts == [
        "A man riding a wave on top of a surfboard.",
        "Two women sitting on a bench (outdoors).",  # COCO: symbols kept by default
        "A little girl's birthday cake",
    ]
    assert result.counts == {"input": 8, "empty": 2, "nsfw_prompt": 0, "nsfw_image": 0, "no_human_word": 2,
                             "special_symbols": 0, "duplicate": 1, "kept": 3}  # fmt: skip
    _assert_invariant(result)
    strict = build_coco_prompts(path, drop_special_symbols=True)
    assert strict.counts["special_symbols"] == 1 and len(strict) == 2
    core = build_coco_prompts(path, words=["giraffe"])
    assert core.prompts == ["A giraffe standing next to a tree."]


def test_coco_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"captions_val2014\.json"):
        build_coco_prompts(tmp_path / "captions_val2014.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="'annotations'"):
        build_coco_prompts(bad)
    bad.write_text(json.dumps({"annotations": [{"image_id": 1, "id": 2, "caption": "a man"}, {"image_id": 1}]}))
    with pytest.raises(ValueError, match=r"annotations\[1\] has no 'caption'"):
        build_coco_prompts(bad)


# ------------------------------------------------------------------------------------------------------------
# DiffusionDB
# ------------------------------------------------------------------------------------------------------------


def _write_diffusiondb(path: Path, rows: list[tuple[str | None, float | None, float | None]]) -> Path:
    """A metadata.parquet with DiffusionDB's 13 columns and types; rows are (prompt, prompt_nsfw, image_nsfw)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(rows)
    table = pa.table({
        "image_name": pa.array([f"{i:08x}-0000-4000-8000-000000000000.png" for i in range(n)], pa.string()),
        "prompt": pa.array([r[0] for r in rows], pa.string()),
        "part_id": pa.array([1 + i // 1000 for i in range(n)], pa.uint16()),
        "seed": pa.array([1000 + i for i in range(n)], pa.uint32()),
        "step": pa.array([50] * n, pa.uint16()),
        "cfg": pa.array([7.0] * n, pa.float32()),
        "sampler": pa.array([8] * n, pa.uint8()),
        "width": pa.array([512] * n, pa.uint16()),
        "height": pa.array([512] * n, pa.uint16()),
        "user_name": pa.array(["c2f288a2ba9df65c"] * n, pa.string()),
        "timestamp": pa.array([dt.datetime(2022, 8, 11, 9, 5, tzinfo=dt.UTC)] * n, pa.timestamp("s", tz="UTC")),
        "image_nsfw": pa.array([r[2] for r in rows], pa.float32()),
        "prompt_nsfw": pa.array([r[1] for r in rows], pa.float32()),
    })  # fmt: skip
    pq.write_table(table, path)
    return path


DIFFUSIONDB_ROWS = [
    ("portrait of a woman, highly detailed, 4k", 0.01, 0.05),  # kept
    ("a beautiful lighthouse at dusk", 0.01, 0.02),  # no human word
    ("a toxic prompt about a man", 0.93, 0.10),  # nsfw_prompt
    ("a girl on a beach", 0.02, 2.0),  # image flagged by SD's safety checker
    ("an old man fishing", 0.03, 0.10),  # rejected: its other row below has an NSFW image
    ("An old man fishing ", 0.03, 0.70),  # the same prompt, NSFW image
    ("[a man] in a {red} coat", 0.01, 0.01),  # special symbols
    ("a (masterpiece:1.3) girl", 0.01, 0.01),  # special symbols
    ("a woman --ar 16:9", 0.01, 0.01),  # special symbols
    ("portrait of a WOMAN,  highly detailed, 4k", 0.02, 0.01),  # duplicate of the first
    (None, 0.0, 0.0),  # empty
    ("   ", 0.0, 0.0),  # empty
    ("a boy with a kite", None, 0.1),  # unknown prompt score -> nsfw_prompt
    ("two kids playing chess", 0.1, math.nan),  # unknown image score -> nsfw_image
    ("a lady in a garden", 0.5, 0.5),  # exactly at the thresholds: kept
]


def test_build_diffusiondb_prompts(tmp_path: Path) -> None:
    path = _write_diffusiondb(tmp_path / "metadata.parquet", DIFFUSIONDB_ROWS)
    result = build_diffusiondb_prompts(path)
    assert result.prompts == ["portrait of a woman, highly detailed, 4k", "a lady in a garden"]
    assert result.counts == {"input": 15, "empty": 2, "nsfw_prompt": 2, "nsfw_image": 4, "no_human_word": 1,
                             "special_symbols": 3, "duplicate": 1, "kept": 2}  # fmt: skip
    _assert_invariant(result)
    assert result.params["prompt_nsfw_max"] == 0.5 and result.params["drop_special_symbols"] is True


def test_diffusiondb_thresholds_are_configurable(tmp_path: Path) -> None:
    path = _write_diffusiondb(tmp_path / "metadata.parquet", DIFFUSIONDB_ROWS)
    loose = build_diffusiondb_prompts(path, prompt_nsfw_max=None, image_nsfw_max=None, drop_special_symbols=False)
    assert loose.counts["nsfw_prompt"] == loose.counts["nsfw_image"] == loose.counts["special_symbols"] == 0
    assert "a toxic prompt about a man" in loose.prompts and "a girl on a beach" in loose.prompts
    assert loose.prompts.count("an old man fishing") == 1 and len(loose) == 10
    _assert_invariant(loose)
    # 2.0 ("flagged and blurred") is NSFW at any threshold, even 1.0.
    lenient = build_diffusiondb_prompts(path, image_nsfw_max=1.0)
    assert "a girl on a beach" not in lenient.prompts and "an old man fishing" in lenient.prompts
    strict = build_diffusiondb_prompts(path, prompt_nsfw_max=0.2, image_nsfw_max=0.2)
    assert strict.prompts == ["portrait of a woman, highly detailed, 4k"]
    with pytest.raises(ValueError, match="prompt_nsfw_max"):
        build_diffusiondb_prompts(path, prompt_nsfw_max=2.0)


def test_diffusiondb_errors(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pytest.raises(FileNotFoundError, match=r"metadata\.parquet"):
        build_diffusiondb_prompts(tmp_path / "metadata.parquet")
    path = tmp_path / "partial.parquet"
    pq.write_table(pa.table({"prompt": ["a man"], "image_nsfw": pa.array([0.1], pa.float32())}), path)
    with pytest.raises(ValueError, match=r"\['prompt_nsfw'\]"):
        build_diffusiondb_prompts(path)


# ------------------------------------------------------------------------------------------------------------
# PromptSet files, sampling
# ------------------------------------------------------------------------------------------------------------


def test_write_and_read(tmp_path: Path) -> None:
    path = _write_coco(tmp_path / "captions.json", ["A man.", "a woman’s hat", "A dog", "ÉLODIE, a girl"])
    result = build_coco_prompts(path)
    out = result.write(tmp_path / "out" / "coco_human.txt")
    assert out.read_bytes().decode("utf-8") == "A man.\na woman’s hat\nÉLODIE, a girl\n"
    stats = json.loads(stats_path_for(out).read_text(encoding="utf-8"))
    assert stats_path_for(out).name == "coco_human.txt.stats.json"
    assert stats["counts"] == result.counts and stats["source"].endswith("captions.json")
    assert read_prompts(out) == result.prompts
    back = PromptSet.read(out)
    assert back.prompts == result.prompts and back.counts == result.counts and back.params == result.params


def test_promptset_checks_invariant() -> None:
    counts = {"input": 3, **dict.fromkeys(REJECTION_RULES, 0), "kept": 2}
    with pytest.raises(ValueError, match="do not add up"):
        PromptSet(["a man", "a woman"], counts)
    with pytest.raises(ValueError, match="lack"):
        PromptSet([], {"input": 0, "kept": 0})
    with pytest.raises(ValueError, match="spans lines"):
        PromptSet(["a man\nand a woman"], {"input": 1, **dict.fromkeys(REJECTION_RULES, 0), "kept": 1})


def test_sample_prompts() -> None:
    prompts = [f"a person number {i}" for i in range(500)]
    first = sample_prompts(prompts, 50, seed=0, repeat=0)
    assert first == sample_prompts(prompts, 50, seed=0, repeat=0)  # deterministic
    assert len(first) == len(set(first)) == 50 and set(first) <= set(prompts)  # without replacement
    assert first != sample_prompts(prompts, 50, seed=0, repeat=1) != sample_prompts(prompts, 50, seed=1, repeat=0)
    shuffled = prompts[:]
    random.Random(3).shuffle(shuffled)
    assert sample_prompts(shuffled, 50, seed=0, repeat=0) == first  # independent of the list's order
    assert sample_prompts(prompts, 10, seed=0, repeat=0) == first[:10]  # nested: a smaller n is a prefix
    assert sorted(sample_prompts(prompts, 500, seed=0, repeat=0)) == sorted(prompts)
    repeats = sample_repeats(prompts, 30, seed=0, repeats=3)
    assert len(repeats) == 3 and repeats[1] == sample_prompts(prompts, 30, seed=0, repeat=1)
    assert len(set(repeats[0]) & set(repeats[1])) < 30
    assert sample_prompts(["a man", "a man"], 2, seed=0, repeat=0) == ["a man", "a man"]
    with pytest.raises(ValueError, match="cannot sample 501"):
        sample_prompts(prompts, 501, seed=0, repeat=0)


def test_docs_list_the_word_lists() -> None:
    """docs/evaluation.md quotes both lists; a word added or removed in the code must be added there too."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text(encoding="utf-8")
    quoted = [line[2:].split() for line in doc.splitlines() if line.startswith("> ")]
    assert {w for line in quoted for w in line} == set(HUMAN_WORDS)
