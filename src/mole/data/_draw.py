"""Drawing helpers for the synthetic data: a transformable pen, named colours, and caption grammar."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from PIL import ImageDraw

RGB = tuple[int, int, int]
Point = tuple[float, float]

# Colour names are words a caption can use; every drawn colour is jittered around its named value.
COLOURS: dict[str, RGB] = {
    "red": (200, 40, 40),
    "orange": (235, 130, 40),
    "yellow": (235, 205, 60),
    "green": (60, 150, 70),
    "blue": (50, 90, 200),
    "purple": (120, 60, 160),
    "pink": (235, 140, 170),
    "brown": (120, 80, 45),
    "black": (35, 35, 38),
    "white": (240, 240, 236),
    "gray": (128, 128, 128),
}
SKIN: dict[str, RGB] = {
    "pale": (250, 225, 205),
    "light": (238, 196, 160),
    "tan": (205, 150, 105),
    "brown": (150, 100, 65),
    "dark": (95, 62, 42),
}
HAIR: dict[str, RGB] = {
    "black": (28, 24, 22),
    "brown": (100, 65, 35),
    "blonde": (225, 190, 110),
    "red": (170, 60, 25),
    "gray": (150, 150, 150),
    "white": (232, 232, 226),
}
EYES: dict[str, RGB] = {
    "brown": (100, 60, 30),
    "blue": (60, 120, 200),
    "green": (60, 140, 80),
    "gray": (120, 130, 140),
}


class Pen:
    """Draws in unit coordinates (the canvas is [0, 1]², y down) through an affine transform.

    ``at`` gives a pen for a local frame (moved, scaled, rotated, mirrored), so a hand or a person is drawn
    once in its own coordinates and placed anywhere. Every shape is a polygon, so every shape transforms.
    """

    def __init__(self, draw: ImageDraw.ImageDraw, m: tuple[float, float, float, float, float, float]) -> None:
        self.draw, self.m = draw, m  # X = a·x + b·y + c, Y = d·x + e·y + f

    @classmethod
    def for_canvas(cls, draw: ImageDraw.ImageDraw, pixels: int) -> Pen:
        return cls(draw, (float(pixels), 0.0, 0.0, 0.0, float(pixels), 0.0))

    def at(self, x: float, y: float, *, scale: float = 1.0, angle: float = 0.0, mirror: bool = False) -> Pen:
        """A pen whose origin is (x, y) here; ``angle`` in degrees, clockwise on screen."""
        cos, sin = math.cos(math.radians(angle)) * scale, math.sin(math.radians(angle)) * scale
        sx = -1.0 if mirror else 1.0
        a, b, c, d, e, f = self.m
        la, lb, ld, le = cos * sx, -sin, sin * sx, cos
        return Pen(
            self.draw,
            (a * la + b * ld, a * lb + b * le, a * x + b * y + c, d * la + e * ld, d * lb + e * le, d * x + e * y + f),
        )

    def _xy(self, pts: Sequence[Point]) -> list[Point]:
        a, b, c, d, e, f = self.m
        return [(a * x + b * y + c, d * x + e * y + f) for x, y in pts]

    def _w(self, width: float) -> int:
        a, b, _, d, e, _ = self.m
        return max(1, round(width * math.sqrt(abs(a * e - b * d))))

    def poly(
        self, pts: Sequence[Point], fill: RGB | None = None, outline: RGB | None = None, width: float = 0.0
    ) -> None:
        self.draw.polygon(self._xy(pts), fill=fill, outline=outline, width=self._w(width) if outline else 0)

    def line(self, pts: Sequence[Point], fill: RGB, width: float) -> None:
        self.draw.line(self._xy(pts), fill=fill, width=self._w(width), joint="curve")

    def ellipse(
        self,
        cx: float,
        cy: float,
        rx: float,
        ry: float,
        fill: RGB | None = None,
        outline: RGB | None = None,
        width: float = 0.0,
        start: float = 0.0,
        end: float = 360.0,
    ) -> None:
        """An ellipse, or the chord from ``start`` to ``end`` degrees (0 = right, 90 = down)."""
        n = max(8, round(48 * (end - start) / 360))
        angles = (math.radians(start + (end - start) * k / n) for k in range(n + 1))
        self.poly([(cx + rx * math.cos(t), cy + ry * math.sin(t)) for t in angles], fill, outline, width)

    def circle(
        self, cx: float, cy: float, r: float, fill: RGB | None = None, outline: RGB | None = None, width: float = 0.0
    ) -> None:
        self.ellipse(cx, cy, r, r, fill, outline, width)

    def capsule(
        self, p0: Point, p1: Point, r: float, fill: RGB, outline: RGB | None = None, width: float = 0.0
    ) -> None:
        """A stadium: a segment thickened by ``r`` with round ends (fingers, limbs)."""
        ang = math.atan2(p1[1] - p0[1], p1[0] - p0[0])
        half = [ang - math.pi / 2 + math.pi * k / 12 for k in range(13)]
        pts = [(p1[0] + r * math.cos(t), p1[1] + r * math.sin(t)) for t in half]
        pts += [(p0[0] - r * math.cos(t), p0[1] - r * math.sin(t)) for t in half]
        self.poly(pts, fill, outline, width)

    def rect(
        self,
        x0: float,
        y0: float,
        x1: float,
        y1: float,
        fill: RGB,
        r: float = 0.0,
        outline: RGB | None = None,
        width: float = 0.0,
    ) -> None:
        """A rectangle with corners rounded by ``r``."""
        r = min(r, (x1 - x0) / 2, (y1 - y0) / 2)
        if r <= 0:
            self.poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], fill, outline, width)
            return
        pts: list[Point] = []
        for cx, cy, a0 in ((x1 - r, y0 + r, -90), (x1 - r, y1 - r, 0), (x0 + r, y1 - r, 90), (x0 + r, y0 + r, 180)):
            pts += [
                (cx + r * math.cos(math.radians(a0 + 15 * k)), cy + r * math.sin(math.radians(a0 + 15 * k)))
                for k in range(7)
            ]
        self.poly(pts, fill, outline, width)


def shade(rgb: RGB, factor: float) -> RGB:
    """``rgb`` scaled by ``factor`` (darker below 1, lighter above), clipped to 0–255."""
    r, g, b = (max(0, min(255, round(c * factor))) for c in rgb)
    return r, g, b


def jitter(rng: random.Random, rgb: RGB, amount: int = 12) -> RGB:
    """A nearby colour, so that one colour name covers a range of pixels, as in photos."""
    r, g, b = (max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)
    return r, g, b


def backdrop(pen: Pen, rgb: RGB, top: float = 0.0, bottom: float = 1.0, light: float = 1.12) -> None:
    """A vertical gradient (lighter at the top), like a studio backdrop or a sky."""
    bands = 24
    for k in range(bands):
        y0 = top + (bottom - top) * k / bands
        pen.rect(-0.1, y0, 1.1, y0 + (bottom - top) / bands + 0.01, shade(rgb, light - (light - 0.94) * k / bands))


def pick(rng: random.Random, table: dict[str, RGB], exclude: Sequence[str | None] = ()) -> tuple[str, RGB]:
    """A random (name, jittered colour) from ``table``, avoiding the names in ``exclude``."""
    name = rng.choice([k for k in table if k not in exclude])
    return name, jitter(rng, table[name])


def join(items: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def article(phrase: str) -> str:
    """``phrase`` with its indefinite article: ``an orange cup``, ``a red cup``."""
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase
