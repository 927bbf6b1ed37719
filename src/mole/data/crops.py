"""Sliding-window crops of scene photos, and perceptual hashes for de-duplication.

The paper crops its mostly 1024×2048+ human-in-the-scene photos with a 1024×1024 sliding window "to keep
as much information as possible", then resizes each crop to 512×512 (§2.1).
"""

from __future__ import annotations

import itertools

import numpy as np
from PIL import Image


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows along one axis, covering it to the end.

    The last window is aligned with the far edge, so no strip of the image is lost and no window hangs
    outside it: ``window_starts(2048, 1024, 1024) == [0, 1024]``, ``window_starts(1365, 1024, 1024) ==
    [0, 341]``.
    """
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def sliding_windows(
    width: int, height: int, window: int = 1024, stride: int | None = None
) -> list[tuple[int, int, int, int]]:
    """Square crop boxes ``(left, top, right, bottom)``.

    An image whose short side is below ``window`` gets windows of its short side instead (one square per
    position along the long side), so a 900×1600 photo still yields crops rather than nothing.
    """
    if window < 1:
        raise ValueError(f"window must be positive, got {window}")
    side = min(window, width, height)
    stride = side if stride is None else max(1, min(stride, side))
    return [
        (x, y, x + side, y + side)
        for y in window_starts(height, side, stride)
        for x in window_starts(width, side, stride)
    ]


def crop_resize(image: Image.Image, box: tuple[int, int, int, int], size: int) -> Image.Image:
    crop = image.crop(box)
    if crop.size != (size, size):
        crop = crop.resize((size, size), Image.Resampling.LANCZOS)
    return crop


def phash(image: Image.Image) -> int:
    """64-bit DCT perceptual hash: 32×32 grayscale, DCT, the top-left 8×8 block against its median."""
    import cv2

    small = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float32)
    block = cv2.dct(small)[:8, :8].flatten()
    bits = block > np.median(block[1:])  # the DC term would dominate the median
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


class Deduplicator:
    """Keeps the first of each group of images whose hashes are within ``max_distance`` bits.

    Indexed by pigeonhole: the 64 bits are split into ``max_distance + 1`` bands, and two hashes that differ
    in at most ``max_distance`` bits agree exactly on at least one band, so only hashes sharing a band are
    compared. Near-constant time per image instead of a scan over everything seen.
    """

    def __init__(self, max_distance: int = 4) -> None:
        if not 0 <= max_distance < 32:
            raise ValueError(f"max_distance must be in 0..31, got {max_distance}")
        self.max_distance = max_distance
        n = max_distance + 1
        edges = [round(64 * k / n) for k in range(n + 1)]
        self._bands = [(lo, hi - lo) for lo, hi in itertools.pairwise(edges)]
        self._index: list[dict[int, list[int]]] = [{} for _ in self._bands]
        self._hashes: list[tuple[int, str]] = []

    def _keys(self, h: int) -> list[int]:
        return [(h >> lo) & ((1 << width) - 1) for lo, width in self._bands]

    def check(self, h: int, source: str) -> str | None:
        """The source this hash duplicates, or None (and then it is remembered)."""
        keys = self._keys(h)
        for band, key in zip(self._index, keys, strict=True):
            for i in band.get(key, ()):
                other, other_source = self._hashes[i]
                if hamming(h, other) <= self.max_distance:
                    return other_source
        self._hashes.append((h, source))
        for band, key in zip(self._index, keys, strict=True):
            band.setdefault(key, []).append(len(self._hashes) - 1)
        return None
