"""The person filter on a zoo of real photos: half-body and portrait people kept, little people and background
crops rejected (scikit-image's offline sample photos, and composite scenes made from them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mole.data.crops import crop_resize, sliding_windows
from mole.data.filters import Box
from mole.data.person import PersonFilter, body_from_face

skdata = pytest.importorskip("skimage.data")


def _rgb(array) -> Image.Image:
    a = np.asarray(array[0] if isinstance(array, tuple) else array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.dtype != np.uint8:
        a = (255 * (a - a.min()) / (np.ptp(a) + 1e-9)).astype(np.uint8)
    return Image.fromarray(a).convert("RGB")


def _background(width: int, height: int) -> Image.Image:
    """A sharp, person-free texture (brick beside grass) of any size."""
    tile = np.concatenate([np.asarray(_rgb(skdata.brick())), np.asarray(_rgb(skdata.grass()))], axis=1)
    reps = (height // tile.shape[0] + 1, width // tile.shape[1] + 1, 1)
    return Image.fromarray(np.tile(tile, reps)[:height, :width])


def _astronaut(side: int) -> Image.Image:
    return _rgb(skdata.astronaut()).resize((side, side), Image.Resampling.LANCZOS)


@pytest.fixture(scope="module")
def scene() -> Image.Image:
    """The issue's case: a 2048×1365 photo with a 512-px-wide half-body person at the bottom right."""
    image = _background(2048, 1365)
    image.paste(_astronaut(512), (1200, 853))
    return image


@pytest.fixture(scope="module")
def person() -> PersonFilter:
    return PersonFilter()


def _little(side: int) -> Image.Image:
    image = _background(512, 512)
    image.paste(_astronaut(side), (200, 300))
    return image


def _lfw(index: int) -> Image.Image:
    face = skdata.lfw_subset()[index]  # 25×25 grey; 0-99 faces, 100-199 non-faces
    return Image.fromarray((face * 255).astype(np.uint8)).convert("RGB").resize((512, 512), Image.Resampling.BICUBIC)


KEEP = {
    "astronaut (half body)": lambda: _rgb(skdata.astronaut()),
    "astronaut portrait close-up": lambda: _rgb(skdata.astronaut()).crop((130, 20, 380, 270)).resize((512, 512)),
    "cameraman (profile, half body)": lambda: _rgb(skdata.camera()),
    "astronaut at 64² (tiny crop)": lambda: _astronaut(64),
}
BACKGROUNDS = (
    "coffee", "chelsea", "brick", "grass", "gravel", "text", "moon", "clock", "hubble_deep_field",
    "stereo_motorcycle", "colorwheel", "horse", "rocket", "page", "logo", "immunohistochemistry",
)  # fmt: skip
REJECT = {
    "little person 160 px in 512²": lambda: _little(160),
    "little person 200 px in 512²": lambda: _little(200),
    "uniform": lambda: Image.new("RGB", (512, 512), (120, 130, 140)),
    "astronaut sky corner": lambda: _rgb(skdata.astronaut()).crop((290, 0, 390, 100)),
    **{name: (lambda n=name: _rgb(getattr(skdata, n)())) for name in BACKGROUNDS},
}


@pytest.mark.parametrize("name", list(KEEP))
def test_keeps_people(name: str, person: PersonFilter) -> None:
    result = person(KEEP[name]())
    assert result.passed, (name, result)


@pytest.mark.parametrize("name", list(REJECT))
def test_rejects_little_people_and_background(name: str, person: PersonFilter) -> None:
    result = person(REJECT[name]())
    assert not result.passed and result.score < person.min_area_fraction, (name, result)
    expected = "person too small" if name.startswith("little") else ("no person", "person too small")
    assert result.reason.startswith(expected)


@pytest.mark.slow
def test_the_half_body_window_of_a_wide_scene_is_kept_and_the_empty_ones_rejected(scene, person) -> None:
    windows = sliding_windows(*scene.size, 1024)
    verdicts = {box: person(crop_resize(scene, box, 512)) for box in windows}
    assert verdicts[(1024, 341, 2048, 1365)].passed, verdicts  # the person: a quarter of the window's width
    for box in [(0, 0, 1024, 1024), (0, 341, 1024, 1365)]:
        assert not verdicts[box].passed and verdicts[box].reason == "no person"
    # What used to go wrong: the face alone covers about 1 % of the crop.
    crop = crop_resize(scene, (1024, 341, 2048, 1365), 512)
    faces = person.faces.detect(crop)
    assert faces and max(f.area for f in faces) / 512**2 < 0.02


@pytest.mark.slow
def test_aligned_faces_are_kept(person) -> None:
    kept = sum(person(_lfw(i)).passed for i in range(8))
    assert kept >= 6  # 25×25 faces upscaled 20×: the cascade misses one now and then (7 of 8 with OpenCV 4.x)
    assert not any(person(_lfw(100 + i)).passed for i in range(6))  # lfw's non-face patches


def test_body_from_face_grows_down_and_clips() -> None:
    body = body_from_face(Box(200, 100, 240, 150), 512, 512)
    assert (body.x0, body.x1) == (160, 280) and body.y0 == 85 and body.y1 == 150 + 6.5 * 50
    at_bottom = body_from_face(Box(200, 480, 240, 512), 512, 512)
    assert at_bottom.y1 == 512 and at_bottom.area < 0.02 * 512**2  # the body is outside the crop
    portrait = body_from_face(Box(100, 60, 400, 360), 512, 512)
    assert portrait.area == 512 * 512


@pytest.mark.slow
def test_curate_scenes_keeps_the_half_body_window(scene, tmp_path: Path) -> None:
    from mole.data.curate import CurateConfig, curate

    raw = tmp_path / "raw"
    raw.mkdir()
    scene.save(raw / "scene.png")
    stats = curate("scenes", raw, tmp_path / "out", CurateConfig(default_caption="a person"), workers=1,
                   progress=False)  # fmt: skip
    [rec] = map(json.loads, (tmp_path / "out" / "manifest.jsonl").read_text().splitlines())
    assert rec["status"] == "kept" and stats["samples"] == 1, rec
    assert rec["crops_rejected"] == {"no person": 2, "person too small": 1}
