"""The person filter: rejects "little person / all background" crops (the paper's second classifier, §2.1).

The paper trains a VGG19 on its own labels; mole ships a training-free default built from detectors OpenCV
bundles (no download): HOG full standing bodies, and frontal (and profile) Haar faces. A face is evidence of
a whole person, not only of a face: half-body and portrait photos — most of a human-centric dataset — show a
face and a torso that HOG (trained on whole pedestrians) misses. Measuring such a person by the face box alone
called a 512-px-wide half-body in a 1024² window "1 % person". So each face is grown into the body it
belongs to (:func:`body_from_face`, from standard figure proportions) and clipped to the crop: a face at the
bottom edge gives a small box (the body is outside the crop), a portrait face fills the crop.

The score is the largest person box's fraction of the crop. The default threshold, 0.1, keeps a person whose
face is ~35 px in a 512² crop (a standing figure about half the crop's height) and rejects smaller figures.

Known limits (detectors, not a classifier): Haar faces fire on coin heads (skimage's ``coins``) and HOG on
some upright textures (``retina``, ``logo``: weights 0.7–1.1, as a real body's); faces turned away and
bodies without a visible face nor a whole standing figure are missed. For stricter curation train a
:class:`~mole.data.quality.QualityFilter` on your own person/background examples.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from mole.data.filters import REFERENCE_SIDE, Box, FaceDetector, FilterResult, _resize_short_side, _rgb_array

logger = logging.getLogger(__name__)

PROFILE_CASCADE = "haarcascade_profileface.xml"

#: Figure proportions: a body is ~7.5 heads tall and ~3 head-widths wide at the shoulders; a Haar face box
#: covers brows to chin (~0.8 of the head), so the body below it is ~6.5 face heights.
BODY_WIDTH_IN_FACES = 3.0
BODY_BELOW_IN_FACES = 6.5
HEAD_ABOVE_IN_FACES = 0.3


def body_from_face(face: Box, width: float, height: float) -> Box:
    """The person a face belongs to, clipped to a ``width`` × ``height`` image.

    Assumes an upright person (the face above the body), which is how photos of people are framed; the
    clip is what makes this honest: only the part of the body that can be in the crop counts.
    """
    fw, fh = face.width, face.height
    cx = (face.x0 + face.x1) / 2
    x0, x1 = cx - BODY_WIDTH_IN_FACES * fw / 2, cx + BODY_WIDTH_IN_FACES * fw / 2
    y0, y1 = face.y0 - HEAD_ABOVE_IN_FACES * fh, face.y1 + BODY_BELOW_IN_FACES * fh
    return Box(max(0.0, x0), max(0.0, y0), min(width, x1), min(height, y1), face.score)


class PersonFilter:
    """Keeps crops with a person of at least ``min_area_fraction`` of the crop; rejects background crops.

    Args:
        min_area_fraction: Smallest accepted person box, as a fraction of the crop area.
        use_hog: Also look for full standing bodies (HOG, ~0.1 s per 512² image).
        use_profile: Also look for faces in profile (a second Haar cascade, both ways, at half the working
            side), only for crops the other detectors leave below the threshold.
        hog_min_weight: HOG detections with a lower SVM weight are ignored.
        work_side: Short side the image is resized to before detection.
        scale_factor, min_neighbors, min_size, cascade: Passed to the face detectors.
    """

    name = "person"

    def __init__(
        self,
        min_area_fraction: float = 0.1,
        *,
        use_hog: bool = True,
        use_profile: bool = True,
        hog_min_weight: float = 0.5,
        work_side: int = REFERENCE_SIDE,
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
        min_size: int = 24,
        cascade: str | os.PathLike[str] | None = None,
    ) -> None:
        if not 0 <= min_area_fraction <= 1:
            raise ValueError(f"min_area_fraction must be in [0, 1], got {min_area_fraction}")
        self.min_area_fraction = float(min_area_fraction)
        self.use_hog, self.hog_min_weight, self.work_side = use_hog, float(hog_min_weight), int(work_side)
        kw = {"scale_factor": scale_factor, "min_neighbors": min_neighbors, "min_size": min_size, "work_side": None}
        # The face detectors run on our working image, already at work_side.
        self.faces = FaceDetector(cascade, **kw)
        self.profiles = None
        if use_profile:
            self.profiles = FaceDetector(Path(cv2.data.haarcascades) / PROFILE_CASCADE, **kw)
        self.hog = cv2.HOGDescriptor()
        self.hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())

    def _work(self, image: Image.Image) -> tuple[np.ndarray, float]:
        return _resize_short_side(_rgb_array(image), self.work_side)

    def _bodies_and_faces(self, work: np.ndarray) -> list[Box]:
        """HOG bodies and bodies grown from frontal faces, in ``work``'s pixels."""
        h, w = work.shape[:2]
        found: list[Box] = []
        if self.use_hog:
            rects, weights = self.hog.detectMultiScale(work, winStride=(8, 8), padding=(8, 8), scale=1.05)
            for (x, y, bw, bh), s in zip(np.reshape(rects, (-1, 4)).tolist(), np.ravel(weights).tolist(), strict=True):
                if s >= self.hog_min_weight:
                    found.append(Box(max(0, x), max(0, y), min(w, x + bw), min(h, y + bh), float(s)))
        return found + [body_from_face(b, w, h) for b in self.faces.detect_array(work)]

    def _profiles(self, work: np.ndarray) -> list[Box]:
        """Bodies grown from faces in profile, both ways (the cascade is trained on one side)."""
        if self.profiles is None:
            return []
        h, w = work.shape[:2]
        # At half the working side: 4× fewer pixels; profiles under ~48 px are missed, which only matters for
        # people near the size threshold, and frontal faces are still searched at full size.
        half, factor = _resize_short_side(work, max(1, min(h, w) // 2))
        hw = half.shape[1]
        faces = self.profiles.detect_array(half)
        flipped = self.profiles.detect_array(np.ascontiguousarray(half[:, ::-1]))
        faces += [Box(hw - b.x1, b.y0, hw - b.x0, b.y1, b.score) for b in flipped]
        faces = [Box(b.x0 / factor, b.y0 / factor, b.x1 / factor, b.y1 / factor, b.score) for b in faces]
        return [body_from_face(b, w, h) for b in faces]

    def detect(self, image: Image.Image) -> list[Box]:
        """People in ``image``'s pixel coordinates: HOG bodies, then bodies grown from faces (frontal, profile)."""
        work, factor = self._work(image)
        found = self._bodies_and_faces(work) + self._profiles(work)
        return [Box(b.x0 / factor, b.y0 / factor, b.x1 / factor, b.y1 / factor, b.score) for b in found]

    def __call__(self, image: Image.Image) -> FilterResult:
        work, _ = self._work(image)
        area = float(work.shape[0] * work.shape[1])
        found = self._bodies_and_faces(work)
        score = max((b.area for b in found), default=0.0) / area
        if score < self.min_area_fraction:  # the profile cascade (2 passes, the costliest) only when needed
            profiles = self._profiles(work)
            found += profiles
            score = max(score, max((b.area for b in profiles), default=0.0) / area)
        if not found:
            return FilterResult(False, 0.0, "no person")
        score = min(1.0, score)
        if score < self.min_area_fraction:
            reason = f"person too small (area {score:.1%} < {self.min_area_fraction * 100:g}%)"
            return FilterResult(False, score, reason)
        return FilterResult(True, score)
