"""Swappable image filters and detectors for curation (paper §2).

The paper trains VGG19 classifiers to drop blurry crops and crops with "little person / all background";
mole ships classical defaults that need no download (Laplacian-variance blur, OpenCV's bundled Haar face
cascade; the HOG + face person filter in :mod:`mole.data.person`), a trainable quality classifier
(:mod:`mole.data.quality`) and a plug-in for a user's own ONNX hand detector. Every filter has the same
shape (:class:`ImageFilter`), so a config dict picks and tunes them (:func:`mole.data.filtering.build_filters`)
and the manifest records each one's score by name. This module imports neither of the filters that build on it
(person, quality): the registry that names them all is :mod:`mole.data.filtering`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import cv2
import numpy as np
from PIL import Image

from mole.data.shards import to_rgb

logger = logging.getLogger(__name__)

#: Short side (pixels) at which scores and detections are computed: the side of the paper's training crops.
REFERENCE_SIDE = 512


@dataclass(frozen=True)
class FilterResult:
    """One filter's verdict on one image."""

    passed: bool
    score: float
    reason: str | None = None
    """Why the image was rejected, e.g. ``"blurry (laplacian variance 7.8 < 50)"``; None when it passed."""


@runtime_checkable
class ImageFilter(Protocol):
    """Anything that scores an image and says whether to keep it."""

    name: str
    """Key of this filter's score in the manifest's ``scores`` dict (``"blur"``, ``"person"``...)."""

    def __call__(self, image: Image.Image) -> FilterResult: ...


@dataclass(frozen=True)
class Box:
    """An axis-aligned detection in the pixel coordinates of the image given to ``detect``."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float = 1.0

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        return max(0.0, self.width) * max(0.0, self.height)

    @property
    def center(self) -> tuple[float, float]:
        return (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2


def _rgb_array(image: Image.Image) -> np.ndarray:
    return np.asarray(to_rgb(image))


def _resize_short_side(array: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    """``array`` resized so that its short side is ``side``, and the factor applied."""
    h, w = array.shape[:2]
    factor = side / min(h, w)
    if factor == 1:
        return array, 1.0
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC
    return cv2.resize(array, size, interpolation=interpolation), factor


# --------------------------------------------------------------------------------------------------- blur


def laplacian_variance(image: Image.Image, reference_side: int = REFERENCE_SIDE) -> float:
    """Variance of the grayscale Laplacian, on the scale of an image whose short side is ``reference_side``.

    Larger images are first downscaled (PIL Lanczos, as curation resizes its crops), so a 2048² photo
    scores what its 512² crop would. Smaller images are *not* upscaled: upsampling adds no detail and
    divides the variance by about the 4th power of the factor, calling every thumbnail blurry. They are
    measured as they are and the variance is multiplied by ``short_side / reference_side``, because on
    photographs it roughly doubles each time the resolution halves (skimage's astronaut: 860 at 512², 1677
    at 256², 3569 at 128², 6482 at 64²); the linear factor brings them back to within ~1.5× of the
    512² value.
    """
    rgb = to_rgb(image)
    short = min(rgb.size)
    if short > reference_side:
        factor = reference_side / short
        size = (max(1, round(rgb.width * factor)), max(1, round(rgb.height * factor)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    gray = cv2.cvtColor(np.asarray(rgb), cv2.COLOR_RGB2GRAY)
    variance = float(cv2.Laplacian(gray, cv2.CV_64F).var())
    return variance * min(1.0, short / reference_side)


class BlurFilter:
    """Rejects blurry images by the variance of their Laplacian (see :func:`laplacian_variance`).

    The default threshold, 50, sits between a mild and a visible blur of a sharp 512² photo: skimage's
    astronaut scores 860 sharp, 66 after a Gaussian blur of σ=1 px, 24 at σ=1.5 px, 12 at σ=2 px and 5 at
    σ=3 px, while sharp sample photos score in the hundreds (camera 1133, coffee ~430, rocket ~310).
    Soft-focus but acceptable photos (skimage's chelsea cat, ~37) fall below it; lower ``min_variance``
    for such data rather than raise it for noisy data: sensor noise raises the variance of blurry images.
    """

    name = "blur"

    def __init__(self, min_variance: float = 50.0, reference_side: int = REFERENCE_SIDE) -> None:
        if min_variance < 0:
            raise ValueError(f"min_variance must be >= 0, got {min_variance}")
        if reference_side < 8:
            raise ValueError(f"reference_side must be >= 8, got {reference_side}")
        self.min_variance = float(min_variance)
        self.reference_side = int(reference_side)

    def __call__(self, image: Image.Image) -> FilterResult:
        score = laplacian_variance(image, self.reference_side)
        if score < self.min_variance:
            return FilterResult(False, score, f"blurry (laplacian variance {score:.1f} < {self.min_variance:g})")
        return FilterResult(True, score)


# --------------------------------------------------------------------------------------------------- faces

FACE_CASCADE = "haarcascade_frontalface_default.xml"


class FaceDetector:
    """Frontal faces with OpenCV's bundled Haar cascade: no download, ~0.2 s per 512² image on one core.

    Detection runs on the image resized so its short side is ``work_side`` (both ways: small crops are
    upscaled so that faces reach the cascade's 24 px minimum, large photos are downscaled for speed), and
    boxes are mapped back to the input's pixels. No histogram equalisation: on the sample images it made
    the cascade fire on flags, fur and the moon without finding more faces. Box scores are the cascade's
    level weights (higher is more face-like; ~4-9 for real faces).
    """

    def __init__(
        self,
        cascade: str | os.PathLike[str] | None = None,
        *,
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
        min_size: int = 24,
        work_side: int | None = REFERENCE_SIDE,
    ) -> None:
        path = Path(cascade) if cascade is not None else Path(cv2.data.haarcascades) / FACE_CASCADE
        if not path.is_file():
            raise FileNotFoundError(
                f"face cascade not found: {path} (OpenCV 5 no longer bundles Haar cascades; install "
                f"opencv-python-headless<5 or pass cascade= a local copy of {FACE_CASCADE})"
            )
        self.cascade = cv2.CascadeClassifier(str(path))
        if self.cascade.empty():
            raise ValueError(f"cannot load face cascade {path}")
        if scale_factor <= 1:
            raise ValueError(f"scale_factor must be > 1, got {scale_factor}")
        self.scale_factor, self.min_neighbors, self.min_size = scale_factor, int(min_neighbors), int(min_size)
        self.work_side = work_side

    def detect_array(self, rgb: np.ndarray) -> list[Box]:
        """Faces in an RGB uint8 array, in its pixel coordinates."""
        work, factor = _resize_short_side(rgb, self.work_side) if self.work_side else (rgb, 1.0)
        gray = cv2.cvtColor(work, cv2.COLOR_RGB2GRAY)
        boxes, _, weights = self.cascade.detectMultiScale3(
            gray,
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(self.min_size, self.min_size),
            outputRejectLevels=True,
        )
        found = [
            Box(x / factor, y / factor, (x + w) / factor, (y + h) / factor, float(s))
            for (x, y, w, h), s in zip(np.reshape(boxes, (-1, 4)).tolist(), np.ravel(weights).tolist(), strict=True)
        ]
        return sorted(found, key=lambda b: -b.area)

    def detect(self, image: Image.Image) -> list[Box]:
        """Faces in ``image``, largest first."""
        return self.detect_array(_rgb_array(image))


class FaceFilter:
    """Keeps images with at least ``min_faces`` detected faces; the score is the number of faces found.

    The count (rather than the face size) is the score because that is what the threshold is about; the
    crop geometry around a face is recorded separately by curation.
    """

    name = "face"

    def __init__(
        self,
        min_faces: int = 1,
        *,
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
        min_size: int = 24,
        work_side: int | None = REFERENCE_SIDE,
        cascade: str | os.PathLike[str] | None = None,
    ) -> None:
        if min_faces < 0:
            raise ValueError(f"min_faces must be >= 0, got {min_faces}")
        self.min_faces = int(min_faces)
        self.detector = FaceDetector(
            cascade, scale_factor=scale_factor, min_neighbors=min_neighbors, min_size=min_size, work_side=work_side
        )

    def __call__(self, image: Image.Image) -> FilterResult:
        count = len(self.detector.detect(image))
        if count < self.min_faces:
            reason = "no face" if count == 0 else f"too few faces ({count} < {self.min_faces})"
            return FilterResult(False, float(count), reason)
        return FilterResult(True, float(count))


# --------------------------------------------------------------------------------------------------- hands


class HandDetector:
    """A user's YOLO-style ONNX hand detector, run with OpenCV's DNN module (no extra runtime).

    Accepted outputs (batch 1): YOLOv5-style ``[1, N, 5+C]`` rows of ``[cx, cy, w, h, objectness,
    class scores...]``, and YOLOv8-style ``[1, 4+C, N]`` columns of ``[cx, cy, w, h, class scores...]``;
    ``layout="auto"`` tells them apart by orientation (rows longer than wide are v5). Coordinates are in
    pixels of the square ``input_size`` network input, which is the image letterboxed (scaled to fit,
    padded with grey 114, RGB, 0-1) as Ultralytics exports expect. Boxes go through class-agnostic NMS.

    Args:
        model: Path of the ``.onnx`` file.
        input_size: Side of the network input the model was exported with.
        conf_threshold: Minimum score (objectness × class score for v5) of a kept box.
        iou_threshold: NMS overlap above which the weaker of two boxes is dropped.
        classes: Class indices that count as hands; None: all.
        layout: ``"auto"``, ``"yolov5"`` (with objectness) or ``"yolov8"`` (without).
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        input_size: int = 640,
        conf_threshold: float = 0.25,
        iou_threshold: float = 0.45,
        classes: Sequence[int] | None = None,
        layout: Literal["auto", "yolov5", "yolov8"] = "auto",
    ) -> None:
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"hand detector model not found: {path}")
        if layout not in ("auto", "yolov5", "yolov8"):
            raise ValueError(f"layout must be auto, yolov5 or yolov8, got {layout!r}")
        try:
            self.net = cv2.dnn.readNetFromONNX(str(path))
        except cv2.error as err:
            raise ValueError(f"OpenCV cannot read the ONNX model {path}: {err}") from err
        self.path, self.input_size, self.layout = path, int(input_size), layout
        self.conf_threshold, self.iou_threshold = float(conf_threshold), float(iou_threshold)
        self.classes = list(classes) if classes is not None else None

    def letterbox(self, rgb: np.ndarray) -> tuple[np.ndarray, float, tuple[float, float]]:
        """The network input: ``rgb`` scaled to fit the square and centred on grey; with scale and offset."""
        h, w = rgb.shape[:2]
        s = self.input_size
        scale = min(s / w, s / h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        resized = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        canvas = np.full((s, s, 3), 114, dtype=np.uint8)
        left, top = (s - nw) // 2, (s - nh) // 2
        canvas[top : top + nh, left : left + nw] = resized
        return canvas, scale, (float(left), float(top))

    def decode(self, output: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw network output → (``[M, 4]`` cx/cy/w/h boxes in input pixels, ``[M]`` scores), unfiltered."""
        out = np.asarray(output, dtype=np.float32)
        if out.ndim == 3:
            if out.shape[0] != 1:
                raise ValueError(f"{self.path}: expected batch 1 output, got shape {out.shape}")
            out = out[0]
        if out.ndim != 2:
            raise ValueError(f"{self.path}: expected a [1, N, 5+C] or [1, 4+C, N] output, got shape {output.shape}")
        transposed = out.shape[0] < out.shape[1]
        rows = out.T if transposed else out
        objectness = self.layout == "yolov5" or (self.layout == "auto" and not transposed)
        first_class = 5 if objectness else 4
        if rows.shape[1] < first_class:
            raise ValueError(f"{self.path}: rows of {rows.shape[1]} values are too short for {self.layout} output")
        cls = rows[:, first_class:]
        if self.classes is not None and cls.shape[1]:
            cls = cls[:, self.classes]
        scores = cls.max(axis=1) if cls.shape[1] else np.ones(len(rows), np.float32)
        if objectness:
            scores = scores * rows[:, 4]
        return rows[:, :4], scores

    def detect(self, image: Image.Image) -> list[Box]:
        """Hands in ``image``, in its pixel coordinates, best first."""
        rgb = _rgb_array(image)
        canvas, scale, (left, top) = self.letterbox(rgb)
        blob = cv2.dnn.blobFromImage(canvas, scalefactor=1 / 255.0, size=(self.input_size, self.input_size))
        self.net.setInput(blob)
        boxes, scores = self.decode(self.net.forward())
        keep = scores >= self.conf_threshold
        boxes, scores = boxes[keep], scores[keep]
        if not len(scores):
            return []
        xywh = np.column_stack([boxes[:, 0] - boxes[:, 2] / 2, boxes[:, 1] - boxes[:, 3] / 2, boxes[:, 2:]])
        picked = cv2.dnn.NMSBoxes(xywh.tolist(), scores.tolist(), self.conf_threshold, self.iou_threshold)
        h, w = rgb.shape[:2]
        result = []
        for i in np.ravel(picked).tolist():
            x, y, bw, bh = xywh[i].tolist()
            x0, y0 = (x - left) / scale, (y - top) / scale
            x1, y1 = (x + bw - left) / scale, (y + bh - top) / scale
            box = Box(min(max(x0, 0), w), min(max(y0, 0), h), min(max(x1, 0), w), min(max(y1, 0), h), float(scores[i]))
            if box.area > 0:
                result.append(box)
        return sorted(result, key=lambda b: -b.score)


# ---------------------------------------------------------------------------------------------------- crop


def square_crop_around(
    image: Image.Image,
    box: Box,
    margin: float = 0.4,
    size: int = 512,
    pad_mode: Literal["reflect", "edge"] = "reflect",
) -> Image.Image:
    """A ``size``² close-up centred on ``box``, for face and hand datasets.

    The square's side is ``max(w, h) · (1 + 2·margin)``. It is shifted (off-centre) to stay inside the image
    when it fits; when the image is smaller than the square along an axis, the square covers the whole axis
    and the missing strip is padded (``reflect`` mirrors the content, which looks less artificial than
    ``edge``'s smeared rows).
    """
    if box.width <= 0 or box.height <= 0:
        raise ValueError(f"box must have a positive size, got {box}")
    if margin < 0 or size < 1:
        raise ValueError(f"margin must be >= 0 and size >= 1, got margin={margin}, size={size}")
    side = max(1, round(max(box.width, box.height) * (1 + 2 * margin)))
    cx, cy = box.center
    w, h = image.size

    def start(center: float, length: int) -> int:
        lo, hi = min(0, length - side), max(0, length - side)  # in bounds if it fits, else covering the axis
        return int(min(max(round(center - side / 2), lo), hi))

    left, top = start(cx, w), start(cy, h)
    if left >= 0 and top >= 0 and left + side <= w and top + side <= h:
        crop = to_rgb(image.crop((left, top, left + side, top + side)))
    else:
        rgb = _rgb_array(image)
        pads = ((max(0, -top), max(0, top + side - h)), (max(0, -left), max(0, left + side - w)), (0, 0))
        padded = np.pad(rgb, pads, mode="reflect" if pad_mode == "reflect" and min(w, h) > 1 else "edge")
        y, x = max(0, top), max(0, left)
        crop = Image.fromarray(padded[y : y + side, x : x + side])
    if crop.size != (size, size):
        crop = crop.resize((size, size), Image.Resampling.LANCZOS)
    return crop
