"""Synthetic human-centric data: every kind draws what its caption says, deterministically."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest

from mole.data._draw import COLOURS
from mole.data.shards import DatasetReader, read_index
from mole.data.synthetic import GENERATOR_VERSION, KINDS, generate, write_dataset

SUBJECT = {"faces": r"\bface\b", "hands": r"\bhand\b", "scenes": r"\b(people|person|man|woman|child)\b",
           "feet": r"\b(feet|shoes)\b"}  # fmt: skip


@pytest.fixture(scope="module")
def samples() -> dict[str, list]:
    return {kind: list(generate(kind, 20, seed=3, size=48)) for kind in KINDS}


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_the_four_kinds_are_registered() -> None:
    assert set(KINDS) == {"faces", "hands", "scenes", "feet"}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_kind_gives_sized_rgb_non_blank_images_with_fitting_captions(kind: str, samples) -> None:
    for image, caption, meta in samples[kind]:
        assert image.size == (48, 48) and image.mode == "RGB"
        assert re.search(SUBJECT[kind], caption), caption
        assert 5 < len(caption.split()) < 40 and caption == caption.strip() and "  " not in caption
        assert not re.search(r"\ba [aeiou]", caption), caption  # "an orange", not "a orange"
        assert np.asarray(image, dtype=np.float32).std() > 15  # drawn, with contrast: not blank
        assert meta["kind"] == kind and meta["seed"] == 3 and meta["attributes"]
    assert len({caption for _, caption, _ in samples[kind]}) >= 10  # captions vary with what is drawn


def test_captions_state_the_sampled_attributes(samples) -> None:
    for _, caption, meta in samples["faces"]:
        a = meta["attributes"]
        assert (f"{a['hair_colour']} hair" in caption) == (a["hair_style"] != "bald"), caption
        assert ("glasses" in caption) == a["glasses"] and ("beard" in caption) == a["beard"]
        assert f"{a['eyes']} eyes" in caption and f"{a['background']} background" in caption
        assert a["person"] in caption and f"{a['skin']} skin" in caption
    for _, caption, meta in samples["hands"]:
        a = meta["attributes"]
        assert f"{a['skin']}-skinned hand" in caption and f"{a['sleeve']} sleeve" in caption
        assert (a["object"] is not None) == ("holding" in caption)
    for _, caption, meta in samples["scenes"]:
        people = meta["attributes"]["people"]
        assert caption.startswith(f"a photo of {['one person', 'two people', 'three people'][len(people) - 1]}")
        assert all(p["person"] in caption and p["top_colour"] in caption for p in people)
    for _, caption, meta in samples["feet"]:
        a = meta["attributes"]
        assert ("bare feet" in caption) == (a["footwear"] == "bare")
        assert a["footwear"] == "bare" or f"{a['footwear_colour']} {a['footwear']}" in caption


def test_face_background_pixels_match_the_captioned_colour(samples) -> None:
    names, values = list(COLOURS), np.array(list(COLOURS.values()), dtype=np.float32)
    for image, _, meta in samples["faces"]:
        edge = np.asarray(image, dtype=np.float32)[20:28, 1:3].reshape(-1, 3).mean(axis=0)  # left edge, mid-height
        nearest = names[int(np.argmin(((values - edge) ** 2).sum(axis=1)))]
        assert nearest == meta["attributes"]["background"]


def test_same_seed_same_bytes_other_seed_other_images() -> None:
    def run(seed: int, count: int = 4) -> list[tuple[bytes, str]]:
        return [(_png(im), caption) for kind in KINDS for im, caption, _ in generate(kind, count, seed=seed, size=32)]

    first = run(1)
    assert first == run(1)
    assert all(a != b for a, b in zip(first, run(2), strict=True))
    # Sample i does not depend on count: a small dataset is a prefix of a larger one with the same seed.
    assert [(_png(im), c) for im, c, _ in generate("hands", 2, seed=1, size=32)] == first[4:6]


def test_write_dataset_round_trips_through_the_reader(tmp_path: Path) -> None:
    index = write_dataset(tmp_path / "d", "scenes", 5, seed=2, size=32, samples_per_shard=2)
    assert index == read_index(tmp_path / "d")
    assert (index.name, index.kind, index.num_samples, len(index.shards)) == ("synthetic-scenes", "scenes", 5, 3)
    assert index.meta == {"generator": "mole.data.synthetic", "generator_version": GENERATOR_VERSION,
                          "kind": "scenes", "count": 5, "seed": 2, "size": 32}  # fmt: skip
    reader = DatasetReader(tmp_path / "d", verify=True)
    read = list(reader)
    expected = list(generate("scenes", 5, seed=2, size=32))
    assert len(read) == 5 and not reader.rejected
    for sample, (image, caption, meta) in zip(read, expected, strict=True):
        assert sample.caption == caption and np.array_equal(np.asarray(sample.image), np.asarray(image))
        assert sample.meta == meta | {"width": 32, "height": 32}
    with pytest.raises(FileExistsError):
        write_dataset(tmp_path / "d", "scenes", 5)
    assert write_dataset(tmp_path / "d", "feet", 3, overwrite=True).kind == "feet"


@pytest.mark.parametrize(
    ("kind", "count", "size", "message"),
    [
        ("elbows", 3, 64, "valid kinds: faces, feet, hands, scenes"),
        ("faces", 0, 64, "count"),
        ("faces", 3, 15, "size"),
    ],
)
def test_bad_arguments_are_rejected_before_anything_is_written(tmp_path: Path, kind, count, size, message) -> None:
    with pytest.raises(ValueError, match=message):
        write_dataset(tmp_path / "d", kind, count, size=size)
    with pytest.raises(ValueError, match=message):
        generate(kind, count, size=size)
    assert not (tmp_path / "d").exists()
