"""Curation filters on real sample photos: blur, faces, people, a real ONNX hand-detector plug-in, crops, and
the trainable quality classifier."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from PIL import ImageFilter as PILFilter

from mole.data.filtering import build_filters, run_filters
from mole.data.filters import (
    BlurFilter,
    Box,
    FaceDetector,
    FilterResult,
    HandDetector,
    ImageFilter,
    square_crop_around,
)
from mole.data.person import PersonFilter

skdata = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skdata.astronaut())


@pytest.fixture(scope="module")
def person_filter() -> PersonFilter:
    return PersonFilter()


def _gradient(size: int = 512) -> Image.Image:
    return Image.fromarray(np.tile(np.linspace(40, 220, size, dtype=np.uint8)[None, :, None], (size, 1, 3)))


# ------------------------------------------------------------------------------------------------- blur


def test_blur_filter_passes_sharp_rejects_blurred_and_is_resolution_independent(astronaut) -> None:
    blur = BlurFilter()
    sharp = blur(astronaut)
    assert sharp.passed and sharp.reason is None and sharp.score > 500
    blurred = blur(astronaut.filter(PILFilter.GaussianBlur(3)))
    assert not blurred.passed and blurred.score < 10
    assert blurred.reason.startswith("blurry (laplacian variance ") and f"{blurred.score:.1f}" in blurred.reason
    small = blur(astronaut.resize((256, 256), Image.Resampling.LANCZOS)).score
    large = blur(astronaut.resize((1024, 1024), Image.Resampling.LANCZOS)).score
    assert 0.5 < small / large < 2, (small, large)
    thumbnail = blur(astronaut.resize((64, 64), Image.Resampling.LANCZOS))
    assert thumbnail.passed, thumbnail  # a sharp thumbnail is not "blurry" for being small


# ------------------------------------------------------------------------------------------------ faces


def test_face_detector_finds_the_astronaut_face_and_nothing_in_a_uniform_image(astronaut) -> None:
    detector = FaceDetector()
    faces = detector.detect(astronaut)
    assert len(faces) >= 1
    face = faces[0]  # largest first
    cx, cy = face.center
    assert 190 < cx < 250 and 80 < cy < 140, face  # her face spans about x 177-272, y 66-161
    assert 60 < face.width < 140 and 60 < face.height < 140
    assert detector.detect(Image.new("RGB", (512, 512), (128, 128, 128))) == []
    # Coordinates are the input's own, whatever its size (detection runs at a 512 short side).
    big = detector.detect(astronaut.resize((1024, 1024)))[0]
    assert abs(big.center[0] - 2 * cx) < 20 and abs(big.center[1] - 2 * cy) < 20


def test_face_filter_counts_faces(astronaut) -> None:
    (face,) = build_filters({"face": {"min_faces": 1}})
    assert face.name == "face" and face(astronaut).passed and face(astronaut).score >= 1
    empty = face(_gradient())
    assert not empty.passed and empty.score == 0 and empty.reason == "no face"


# ----------------------------------------------------------------------------------------------- person


def test_person_filter_keeps_the_astronaut(astronaut, person_filter) -> None:
    result = person_filter(astronaut)
    assert result.passed and result.score >= 0.02, result
    small = person_filter(astronaut.resize((64, 64), Image.Resampling.LANCZOS))  # curation-test-sized crops
    assert small.passed, small


@pytest.mark.parametrize(
    "name",
    ["uniform", "gradient", "astronaut sky corner"],
)
def test_person_filter_rejects_background(name, astronaut, person_filter) -> None:
    image = {
        "uniform": Image.new("RGB", (512, 512), (120, 130, 140)),
        "gradient": _gradient(),
        "astronaut sky corner": astronaut.crop((290, 0, 390, 100)),  # between her hair and the shuttle
    }[name]
    result = person_filter(image)
    assert not result.passed and result.score < 0.02
    assert result.reason is not None and "person" in result.reason


def test_person_filter_reports_small_people(person_filter, astronaut) -> None:
    strict = PersonFilter(min_area_fraction=0.9)
    result = strict(astronaut)
    assert not result.passed and result.reason.startswith("person too small (area ")
    assert f"{result.score:.1%}" in result.reason and "< 90%" in result.reason


# ------------------------------------------------------------------------------------------ hand plug-in


class _ToyYolo(torch.nn.Module):
    """A conv net with YOLO-shaped output: one box of fixed size per 32-px cell, objectness = cell is white."""

    def __init__(self, v8: bool = False, size: int = 640, stride: int = 32, box: float = 256.0) -> None:
        super().__init__()
        self.v8, self.box = v8, box
        self.pool = torch.nn.Conv2d(3, 1, stride, stride=stride, bias=False)
        torch.nn.init.constant_(self.pool.weight, 1.0 / (3 * stride * stride))  # mean brightness per cell
        centres = torch.arange(size // stride, dtype=torch.float32) * stride + stride / 2
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")
        self.register_buffer("cx", cx.reshape(1, -1))
        self.register_buffer("cy", cy.reshape(1, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        brightness = self.pool(x).flatten(1)  # [1, N]
        obj = torch.sigmoid(40 * (brightness - 0.9))
        side = torch.ones_like(brightness) * self.box
        if self.v8:  # [1, 4 + C, N], no objectness
            return torch.stack([self.cx, self.cy, side, side, obj], dim=1)
        return torch.stack([self.cx, self.cy, side, side, obj, torch.ones_like(obj)], dim=2)  # [1, N, 5 + C]


def _export(model: torch.nn.Module, path: Path) -> Path:
    pytest.importorskip("onnx", reason="torch.onnx.export needs the onnx package")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, 3, 640, 640),), str(path), dynamo=False)
    return path


@pytest.mark.parametrize("v8", [False, True], ids=["yolov5", "yolov8"])
def test_hand_detector_runs_a_real_onnx_model(tmp_path, v8) -> None:
    model = _export(_ToyYolo(v8=v8), tmp_path / "hands.onnx")
    # 320×240: letterboxed ×2 into 640×480 with 80 px of grey above and below, so the mapping back matters.
    image = Image.new("RGB", (320, 240), (70, 70, 70))
    squares = [(60, 60, 108, 108), (200, 130, 248, 178)]
    draw = ImageDraw.Draw(image)
    for sq in squares:
        draw.rectangle((sq[0], sq[1], sq[2] - 1, sq[3] - 1), fill=(255, 255, 255))
    found = HandDetector(model).detect(image)
    # Several cells of each square fire; NMS must leave exactly one box per square.
    assert len(found) == 2, found
    for box in found:
        cx, cy = box.center
        assert any(sq[0] <= cx <= sq[2] and sq[1] <= cy <= sq[3] for sq in squares), box
        assert box.width == pytest.approx(128, abs=1) and box.height == pytest.approx(128, abs=1)  # 256 / 2
        assert 0 <= box.x0 < box.x1 <= 320 and 0 <= box.y0 < box.y1 <= 240 and box.score > 0.9
    assert {round(b.center[0]) < 160 for b in found} == {True, False}  # one per square
    assert HandDetector(model).detect(Image.new("RGB", (320, 240), (70, 70, 70))) == []


def test_hand_detector_errors(tmp_path) -> None:
    missing = tmp_path / "nope" / "hands.onnx"
    with pytest.raises(FileNotFoundError, match=r"nope/hands\.onnx"):
        HandDetector(missing)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"junk\.onnx"):
        HandDetector(junk)


# ------------------------------------------------------------------------------------------------ crops


def _marked(size: tuple[int, int], point: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 200, (size[1], size[0], 3), dtype=np.uint8)
    array[point[1], point[0]] = (255, 0, 255)  # a pixel no other pixel matches
    return Image.fromarray(array)


def _find_marker(image: Image.Image) -> tuple[int, int]:
    ys, xs = np.nonzero(np.all(np.asarray(image) == (255, 0, 255), axis=-1))
    assert len(xs) == 1
    return int(xs[0]), int(ys[0])


def test_square_crop_is_centred_on_the_box_when_it_fits() -> None:
    image = _marked((640, 480), (320, 240))
    box = Box(300, 220, 340, 260)  # side 40 → 40 · 1.8 = 72
    crop = square_crop_around(image, box, margin=0.4, size=72)
    assert crop.size == (72, 72)
    assert _find_marker(crop) == (36, 36)
    assert square_crop_around(image, box, size=512).size == (512, 512)


def test_square_crop_shifts_to_stay_inside_the_image() -> None:
    image = _marked((640, 480), (620, 20))
    crop = square_crop_around(image, Box(605, 5, 635, 35), margin=0.4, size=54)  # 54 px: would cross 2 edges
    x, y = _find_marker(crop)
    # Flush with the right and top edges: the marker sits at its image offset from them.
    assert (x, y) == (54 - (640 - 620), 20)
    assert np.array_equal(np.asarray(crop), np.asarray(image)[0:54, 640 - 54 : 640])  # no padding


def test_square_crop_pads_images_smaller_than_the_square() -> None:
    tiny = Image.new("RGB", (20, 12), (10, 200, 30))
    crop = square_crop_around(tiny, Box(0, 0, 20, 12), margin=0.4, size=64)
    assert crop.size == (64, 64)
    assert np.all(np.abs(np.asarray(crop).astype(int) - (10, 200, 30)) <= 1)  # reflected content, never black
    with pytest.raises(ValueError, match="positive size"):
        square_crop_around(tiny, Box(5, 5, 5, 9))


# ---------------------------------------------------------------------------------------- config & runs


def test_build_filters_names_config_errors() -> None:
    with pytest.raises(ValueError, match="unknown filter 'sharpness'"):
        build_filters({"sharpness": {}})
    with pytest.raises(ValueError, match=r"filters\.blur: unknown option 'min_var'.*min_variance"):
        build_filters({"blur": {"min_var": 3}})
    with pytest.raises(ValueError, match=r"filters\.person: min_area_fraction must be in \[0, 1\]"):
        build_filters({"person": {"min_area_fraction": 2}})
    with pytest.raises(ValueError, match=r"filters\.quality: unknown option 'min_probability'"):
        build_filters({"quality": {"checkpoint": "q.pt", "min_probability": 0.3}})
    filters = build_filters({"blur": {"min_variance": 10}, "person": None})
    assert [f.name for f in filters] == ["blur", "person"] and filters[0].min_variance == 10
    assert all(isinstance(f, ImageFilter) for f in filters)


def test_run_filters_stops_at_the_first_rejection(astronaut) -> None:
    filters = build_filters({"blur": {}, "person": {}})
    passed, scores, reason = run_filters(filters, astronaut)
    assert passed and reason is None and set(scores) == {"blur", "person"}
    passed, scores, reason = run_filters(filters, astronaut.filter(PILFilter.GaussianBlur(3)))
    assert not passed and list(scores) == ["blur"] and reason.startswith("blurry")


# -------------------------------------------------------------------------------------- quality classifier


def _shapes(rng: np.random.Generator, n: int, blurred: bool) -> list[Image.Image]:
    images = []
    for _ in range(n):
        image = Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = (int(v) for v in rng.integers(0, 48, 2))
            x1, y1 = x0 + int(rng.integers(8, 24)), y0 + int(rng.integers(8, 24))
            colour = tuple(int(v) for v in rng.integers(0, 255, 3))
            (draw.rectangle if rng.random() < 0.5 else draw.ellipse)((x0, y0, x1, y1), fill=colour)
        images.append(image.filter(PILFilter.GaussianBlur(2)) if blurred else image)
    return images


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict, list[Image.Image], list[Image.Image]]:
    from mole.data.quality import train_quality_classifier

    root = tmp_path_factory.mktemp("quality")
    rng = np.random.default_rng(0)
    for label, blurred in (("sharp", False), ("blurred", True)):
        for i, image in enumerate(_shapes(rng, 24, blurred)):
            (root / label).mkdir(exist_ok=True)
            image.save(root / label / f"{i:02d}.png")
    (root / "sharp" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: one thread is several times faster than two contending ones
    try:
        metrics = train_quality_classifier(
            root / "sharp", root / "blurred", root / "q.pt", epochs=15, batch_size=16, lr=3e-3
        )
    finally:
        torch.set_num_threads(threads)
    held_rng = np.random.default_rng(1)
    return root / "q.pt", metrics, _shapes(held_rng, 8, False), _shapes(np.random.default_rng(1), 8, True)


def test_quality_classifier_learns_sharp_versus_blurred(trained) -> None:
    from mole.data.quality import QualityFilter

    checkpoint, metrics, sharp, blurred = trained
    assert metrics["val_accuracy"] > 0.8, metrics
    assert metrics["skipped_positives"] == 1 and metrics["positives"] == 24 and metrics["negatives"] == 24
    assert metrics["train_images"] + metrics["val_images"] == 48 and 1 <= metrics["best_epoch"] <= 15
    quality = QualityFilter(checkpoint)
    p_sharp, p_blurred = quality.predict(sharp), quality.predict(blurred)
    assert p_sharp.mean() > p_blurred.mean() + 0.2, (p_sharp, p_blurred)
    assert (p_sharp > p_blurred).mean() >= 0.75  # each held-out pair is the same scene, sharp and blurred


def test_quality_filter_through_the_filter_interface(trained) -> None:
    checkpoint, _, sharp, blurred = trained
    (quality,) = build_filters({"quality": {"checkpoint": str(checkpoint), "min_prob": 0.5}})
    assert quality.name == "quality" and isinstance(quality, ImageFilter)
    kept = [quality(im) for im in sharp]
    assert all(isinstance(r, FilterResult) and 0 <= r.score <= 1 for r in kept)
    assert sum(r.passed for r in kept) > sum(quality(im).passed for im in blurred)
    rejected = next(quality(im) for im in blurred if not quality(im).passed)
    assert rejected.reason.startswith("low quality (p(good) ")
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        build_filters({"quality": {"checkpoint": str(checkpoint.parent / "missing.pt")}})


def test_quality_training_refuses_thin_folders(tmp_path) -> None:
    from mole.data.quality import train_quality_classifier

    (tmp_path / "pos").mkdir()
    (tmp_path / "neg").mkdir()
    _shapes(np.random.default_rng(0), 1, False)[0].save(tmp_path / "pos" / "only.png")
    with pytest.raises(ValueError, match=r"positives folder .*pos has 1 readable image"):
        train_quality_classifier(tmp_path / "pos", tmp_path / "neg", tmp_path / "q.pt", epochs=1)
    with pytest.raises(FileNotFoundError, match="absent"):
        train_quality_classifier(tmp_path / "absent", tmp_path / "neg", tmp_path / "q.pt", epochs=1)
    assert not (tmp_path / "q.pt").exists()


@pytest.mark.parametrize("fmt", ["module", "torchscript", "state_dict"])
def test_quality_classifier_on_a_local_backbone(tmp_path, trained, fmt) -> None:
    from mole.data.quality import QualityFilter, train_quality_classifier

    root = trained[0].parent
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3))
    path = tmp_path / "backbone.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated but still what people have
        if fmt == "module":
            torch.save(backbone, path)
        elif fmt == "torchscript":
            torch.jit.save(torch.jit.script(backbone), str(path))
        else:
            torch.save(backbone.state_dict(), path)
            with pytest.raises(ValueError, match="holds a OrderedDict, not a module"):
                train_quality_classifier(root / "sharp", root / "blurred", tmp_path / "q.pt", backbone=path, epochs=1)
            return
        metrics = train_quality_classifier(
            root / "sharp", root / "blurred", tmp_path / "q.pt", backbone=path, epochs=2, image_size=32
        )
        assert metrics["best_epoch"] in (1, 2)
        quality = QualityFilter(tmp_path / "q.pt")
        assert quality.image_size == 32 and 0 <= quality(trained[2][0]).score <= 1
        path.rename(tmp_path / "moved.pt")
        with pytest.raises(FileNotFoundError, match="pass backbone= its new path"):
            QualityFilter(tmp_path / "q.pt")
        assert 0 <= QualityFilter(tmp_path / "q.pt", backbone=tmp_path / "moved.pt")(trained[2][0]).score <= 1
