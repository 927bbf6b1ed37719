"""Procedurally drawn human-centric image–caption pairs: the embedded default data (no downloads).

Four kinds, as in the paper's data: close-up ``faces`` and ``hands`` (the two experts' data), ``scenes``
with 1–3 people (the stage-1 fine-tuning data), and close-up ``feet`` (the footnote's possible third
expert). Each image's attributes (skin tone, hair, gesture, clothing...) are sampled, drawn, stated in the
caption, and stored in the sample's ``meta["attributes"]``, so captions carry real signal about pixels.

Images are drawn with PIL at 4× and downsampled with LANCZOS (anti-aliasing: small sizes still read as a
face or a hand). Sample ``i`` is drawn from its own ``random.Random`` seeded with (kind, seed, i): the same
arguments give byte-identical PNGs, and ``count=10`` gives the first 10 samples of ``count=100``.

Adding a kind is one drawing function ``(rng, pen) -> (caption, attributes)`` and one entry in ``KINDS``.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Callable, Iterator
from typing import Any

from PIL import Image, ImageDraw

from mole.data._draw import COLOURS, EYES, HAIR, RGB, SKIN, Pen, Point, article, backdrop, jitter, join, pick, shade
from mole.data.shards import DatasetIndex, ShardWriter

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when a change alters the pixels or captions of existing (kind, seed, i)
MIN_SIZE, MAX_SIZE = 16, 1024
_SUPERSAMPLE = 4

# --- faces ----------------------------------------------------------------------------------------------


def _draw_face(rng: random.Random, pen: Pen) -> tuple[str, dict[str, Any]]:
    who = rng.choice(["man", "woman", "child", "person"])
    skin_name, skin = pick(rng, SKIN)
    hair_name, hair = pick(rng, HAIR, exclude=("gray", "white") if who == "child" else ())
    styles = {
        "man": ["short", "short", "curly", "bald"],
        "woman": ["long", "long", "curly", "short"],
        "child": ["short", "long", "curly"],
        "person": ["short", "long", "curly", "bald"],
    }
    style = rng.choice(styles[who])
    eye_name, eye = pick(rng, EYES)
    expression = rng.choice(["smiling", "neutral", "surprised"])
    glasses = rng.random() < 0.3
    beard = who == "man" and rng.random() < 0.45
    bg_name, bg = pick(rng, COLOURS, exclude=(hair_name,))
    shirt_name, shirt = pick(rng, COLOURS, exclude=(bg_name,))

    backdrop(pen, bg)
    cx, cy = 0.5 + rng.uniform(-0.03, 0.03), 0.5 + rng.uniform(-0.02, 0.03)
    rx, ry = (0.29, 0.31) if who == "child" else (rng.uniform(0.25, 0.28), rng.uniform(0.34, 0.37))
    line = shade(skin, 0.78)
    pen.ellipse(cx, 1.1, 0.5, 0.28, shirt)  # shoulders
    pen.rect(cx - 0.1, cy + ry * 0.5, cx + 0.1, cy + ry + 0.1, shade(skin, 0.88))  # neck
    if style == "long":
        pen.ellipse(cx, cy - 0.03, rx * 1.28, ry * 1.12, hair)
        pen.rect(cx - rx * 1.28, cy, cx + rx * 1.28, cy + ry * 1.25, hair, r=0.05)
    if style == "curly":
        for k in range(11):
            t = math.radians(160 + 220 * k / 10)
            pen.circle(cx + rx * 1.12 * math.cos(t), cy - 0.05 + ry * 1.05 * math.sin(t), 0.06, hair)
    for side in (-1, 1):  # ears
        pen.ellipse(cx + side * rx * 0.98, cy + 0.01, 0.045, 0.07, shade(skin, 0.93), line, 0.004)
    pen.ellipse(cx, cy, rx, ry, skin, line, 0.005)
    if style == "bald":
        pen.ellipse(cx - rx * 0.3, cy - ry * 0.7, rx * 0.3, ry * 0.12, shade(skin, 1.08))  # highlight
    else:  # hair over the top of the head, down to a hairline parted on one side
        part = rng.choice([-1, 1]) * 0.12
        pts = [
            (cx + rx * 1.05 * math.cos(math.radians(a)), cy - 0.02 + ry * 1.04 * math.sin(math.radians(a)))
            for a in range(190, 351, 8)
        ]
        pts += [(cx + rx * t, cy - ry * (0.52 - 0.3 * t * t + part * t)) for t in (1 - k / 10 for k in range(21))]
        pen.poly(pts, hair)
    if beard:
        pts = [
            (cx + rx * 1.01 * math.cos(math.radians(a)), cy + ry * 1.01 * math.sin(math.radians(a)))
            for a in range(0, 181, 10)
        ]
        pts += [(cx - rx, cy + 0.06), (cx - rx * 0.4, cy + 0.13), (cx + rx * 0.4, cy + 0.13), (cx + rx, cy + 0.06)]
        pen.poly(pts, hair)
    # eyes, brows, nose, mouth
    ey, ex = (cy + 0.0, rx * 0.42) if who == "child" else (cy - 0.06, rx * 0.42)
    open_ = 0.045 if expression == "surprised" else 0.032
    brow = shade(hair, 0.7) if style != "bald" else (60, 45, 35)
    lift = 0.03 if expression == "surprised" else 0.0
    for side in (-1, 1):
        x = cx + side * ex
        pen.ellipse(x, ey, 0.058, open_, (248, 248, 245), line, 0.004)
        pen.circle(x, ey, 0.027, eye)
        pen.circle(x, ey, 0.013, (15, 15, 15))
        pen.circle(x + 0.009, ey - 0.009, 0.006, (255, 255, 255))
        pen.line(
            [(x - side * 0.055, ey - 0.06 - lift * 0.6), (x, ey - 0.075 - lift), (x + side * 0.06, ey - 0.062 - lift)],
            brow,
            0.014,
        )
        if glasses:
            pen.circle(x, ey, 0.08, None, (25, 25, 25), 0.012)
    if glasses:
        pen.line([(cx - ex + 0.08, ey), (cx + ex - 0.08, ey)], (25, 25, 25), 0.012)
        for side in (-1, 1):
            pen.line([(cx + side * (ex + 0.08), ey), (cx + side * rx * 0.97, ey - 0.01)], (25, 25, 25), 0.01)
    pen.ellipse(cx, cy + ry * 0.3, 0.035, 0.02, shade(skin, 0.8))  # nose
    pen.line([(cx - 0.005, ey + 0.04), (cx + 0.012, cy + ry * 0.28)], shade(skin, 0.85), 0.008)
    my = cy + ry * 0.58
    lips = rng.choice([(190, 40, 60), (200, 90, 110)]) if who == "woman" else shade((180, 90, 80), 0.9)
    if expression == "smiling":
        pen.ellipse(cx, my - 0.02, 0.1, 0.065, (110, 25, 35), lips, 0.008, 0, 180)
        pen.ellipse(cx, my - 0.02, 0.085, 0.022, (250, 250, 250), None, 0, 0, 180)
    elif expression == "surprised":
        pen.ellipse(cx, my, 0.035, 0.045, (90, 20, 30), lips, 0.01)
    else:
        pen.capsule((cx - 0.06, my), (cx + 0.06, my), 0.011, lips)

    attrs = {
        "person": who,
        "skin": skin_name,
        "hair_colour": hair_name,
        "hair_style": style,
        "eyes": eye_name,
        "expression": expression,
        "glasses": glasses,
        "beard": beard,
        "background": bg_name,
        "shirt": shirt_name,
    }
    adjectives = [expression] if expression != "neutral" else []
    adjectives += ["bald"] if style == "bald" else []
    with_ = [f"{skin_name} skin"] + (["a neutral expression"] if expression == "neutral" else [])
    with_ += [f"{style} {hair_name} hair"] if style != "bald" else []
    with_ += ([article(f"{hair_name} beard") if style == "bald" else "a beard"] if beard else []) + [
        f"{eye_name} eyes"
    ]
    prefix = rng.choice(["a close-up photo of", "a close-up portrait of"])
    caption = f"{prefix} the face of a {' '.join([*adjectives, who])} with {join(with_)}"
    caption += (", wearing glasses" if glasses else "") + f", on {article(bg_name)} background"
    return caption, attrs


# --- hands ----------------------------------------------------------------------------------------------

_GESTURES = {
    "open palm": "showing an open palm",
    "fist": "making a fist",
    "pointing": "pointing up",
    "peace sign": "making a peace sign",
    "thumbs up": "giving a thumbs up",
}
_HELD = {
    "open palm": ["cup", "flower"],
    "fist": ["flower", "pen", "cup"],
    "pointing": ["pen"],
    "peace sign": ["flower", "pen"],
    "thumbs up": [],
}


def _draw_held(pen: Pen, obj: str, rgb: RGB, gesture: str) -> None:
    """The held object, drawn after the palm and before the curled fingers, which then grip it."""
    if obj == "cup":
        y = -0.16 if gesture == "open palm" else -0.3
        pen.ellipse(0.13, y - 0.08, 0.06, 0.055, None, shade(rgb, 0.8), 0.022)  # handle
        pen.rect(-0.11, y - 0.2, 0.13, y + 0.02, rgb, 0.03, shade(rgb, 0.75), 0.008)
        pen.ellipse(0.01, y - 0.2, 0.12, 0.025, shade(rgb, 0.6))
        return
    end: Point = {"fist": (0.06, -0.62), "open palm": (0.2, -0.45)}.get(gesture, (0.32, -0.55))
    start: Point = (-0.06, 0.0) if gesture != "open palm" else (-0.08, -0.12)
    if obj == "pen":
        pen.capsule(start, end, 0.016, rgb, shade(rgb, 0.6), 0.004)
        pen.capsule(
            end, (end[0] + (end[0] - start[0]) * 0.08, end[1] + (end[1] - start[1]) * 0.08), 0.008, (40, 40, 40)
        )
        return
    pen.line([start, end], (50, 130, 50), 0.016)  # flower: stem, petals, centre
    pen.ellipse(start[0] * 0.4 + end[0] * 0.6 + 0.04, start[1] * 0.4 + end[1] * 0.6, 0.05, 0.022, (60, 150, 60))
    for k in range(6):
        t = math.radians(60 * k)
        pen.circle(end[0] + 0.055 * math.cos(t), end[1] + 0.055 * math.sin(t), 0.045, rgb, shade(rgb, 0.8), 0.004)
    pen.circle(end[0], end[1], 0.035, (240, 200, 50))


def _draw_hand(rng: random.Random, pen: Pen) -> tuple[str, dict[str, Any]]:
    skin_name, skin = pick(rng, SKIN)
    gesture = rng.choice(list(_GESTURES))
    obj = rng.choice(_HELD[gesture]) if _HELD[gesture] and rng.random() < 0.45 else None
    dull = ("black", "brown", "gray", "green") if obj == "flower" else ("white",)
    obj_name, obj_rgb = pick(rng, COLOURS, exclude=dull) if obj else (None, (0, 0, 0))
    sleeve_name, sleeve = pick(rng, COLOURS)
    bg_name, bg = pick(rng, COLOURS, exclude=(sleeve_name,))
    left = rng.random() < 0.5

    backdrop(pen, bg)
    scale = rng.uniform(1.25, 1.45)  # close-up: the hand fills most of the frame
    h = pen.at(0.5 + rng.uniform(-0.04, 0.04), 0.86, scale=scale, angle=rng.uniform(-14, 14), mirror=left)
    line, r = shade(skin, 0.72), 0.034
    top = -0.25 if gesture == "thumbs up" else -0.32
    h.rect(-0.15, top, 0.15, 0.06, skin, 0.07, line, 0.006)  # palm and wrist
    if gesture == "open palm":
        h.line([(-0.1, -0.12), (0.0, -0.17), (0.12, -0.2)], line, 0.006)  # palm creases
        h.line([(-0.08, -0.02), (-0.04, -0.12), (0.02, -0.18)], line, 0.006)
    if obj:
        _draw_held(h, obj, obj_rgb, gesture)
    xs, lengths = (-0.105, -0.035, 0.035, 0.105), (0.21, 0.235, 0.215, 0.17)
    extended = {"open palm": (0, 1, 2, 3), "pointing": (0,), "peace sign": (0, 1)}.get(gesture, ())
    spread = {"open palm": (-14, -5, 4, 13), "peace sign": (-14, 12, 0, 0)}.get(gesture, (0, 0, 0, 0))
    for i, (x, length) in enumerate(zip(xs, lengths, strict=True)):
        if gesture == "thumbs up":  # fingers wrapped horizontally, seen from the side
            y = -0.2 + 0.065 * i
            h.capsule((-0.06, y), (0.15, y), r, skin, line, 0.005)
        elif i in extended:
            a = math.radians(spread[i])
            tip = (x + length * math.sin(a), -0.28 - length * math.cos(a))
            h.capsule((x, -0.26), tip, r if i < 3 else 0.03, skin, line, 0.005)
            h.ellipse(tip[0], tip[1] + 0.01, 0.02, 0.026, shade(skin, 1.08))  # nail
        else:  # curled: the folded middle phalanx shows as a short bump
            h.capsule((x, -0.31), (x, -0.22), r + 0.002, skin, line, 0.005)
    if gesture == "open palm":
        h.capsule((-0.13, -0.06), (-0.22, -0.16), 0.04, skin, line, 0.005)
        h.capsule((-0.22, -0.16), (-0.28, -0.26), 0.036, skin, line, 0.005)
    elif gesture == "thumbs up":
        h.capsule((-0.1, -0.2), (-0.1, -0.45), 0.042, skin, line, 0.005)
        h.ellipse(-0.1, -0.44, 0.022, 0.028, shade(skin, 1.08))
    else:  # thumb folded across the curled fingers
        h.capsule((-0.16, -0.08), (0.05, -0.2), 0.036, skin, line, 0.005)
    h.rect(-0.17, 0.03, 0.17, 0.5, sleeve, 0.02, shade(sleeve, 0.7), 0.005)
    h.rect(-0.17, 0.03, 0.17, 0.08, shade(sleeve, 0.85))  # cuff

    attrs = {
        "skin": skin_name,
        "gesture": gesture,
        "object": obj,
        "object_colour": obj_name,
        "sleeve": sleeve_name,
        "background": bg_name,
        "side": "left" if left else "right",
    }
    caption = f"a close-up photo of a {skin_name}-skinned hand {_GESTURES[gesture]}"
    caption += f", holding {article(f'{obj_name} {obj}')}" if obj else ""
    return caption + f", in {article(sleeve_name)} sleeve, on {article(bg_name)} background", attrs


# --- feet -----------------------------------------------------------------------------------------------

_GROUNDS = {"wood": "on a wooden floor", "tiles": "on a tiled floor", "sand": "on sand", "grass": "on green grass"}


def _draw_ground(rng: random.Random, pen: Pen, ground: str) -> None:
    base = {"wood": (150, 100, 60), "tiles": (215, 215, 210), "sand": (225, 200, 150), "grass": (70, 150, 60)}
    rgb = jitter(rng, base[ground])
    pen.rect(-0.1, -0.1, 1.1, 1.1, rgb)
    if ground == "wood":
        for k in range(7):
            y = k / 6
            pen.line([(0, y), (1, y)], shade(rgb, 0.7), 0.006)
            x = rng.uniform(0, 1)
            pen.line([(x, y), (x, y + 1 / 6)], shade(rgb, 0.75), 0.005)
    elif ground == "tiles":
        for k in range(6):
            pen.line([(k / 5, 0), (k / 5, 1)], shade(rgb, 0.75), 0.008)
            pen.line([(0, k / 5), (1, k / 5)], shade(rgb, 0.75), 0.008)
    else:
        for _ in range(260 if ground == "grass" else 180):
            x, y = rng.random(), rng.random()
            tone = shade(rgb, rng.uniform(0.75, 1.2))
            if ground == "grass":
                pen.line([(x, y), (x + rng.uniform(-0.02, 0.02), y - rng.uniform(0.03, 0.06))], tone, 0.006)
            else:
                pen.circle(x, y, 0.004, tone)


def _draw_foot(pen: Pen, wear: str, rgb: RGB, skin: RGB) -> None:
    """A right foot seen from above, toes up, big toe on the left; origin at the heel."""
    if wear == "shoes":
        sole = (245, 245, 240) if sum(rgb) < 360 else (40, 40, 40)
        for grow, colour in ((0.012, sole), (0.0, rgb)):
            pen.ellipse(0, 0, 0.085 + grow, 0.09 + grow, colour)
            pen.poly([(-0.085 - grow, 0), (-0.1 - grow, -0.28), (0.115 + grow, -0.28), (0.085 + grow, 0)], colour)
            pen.ellipse(0.008, -0.28, 0.108 + grow, 0.12 + grow, colour)
        pen.ellipse(0.0, -0.06, 0.045, 0.09, shade(rgb, 0.55))  # opening
        for k in range(4):
            y = -0.13 - 0.035 * k
            pen.line([(-0.045, y), (0.05, y)], (235, 235, 230), 0.008)  # laces
        return
    colour = rgb if wear == "socks" else skin
    line = shade(colour, 0.75)
    pen.ellipse(0, 0, 0.07, 0.08, colour, line, 0.005)
    pen.ellipse(0.015, -0.25, 0.112, 0.09, colour, line, 0.005)
    pen.poly([(-0.068, 0.005), (-0.093, -0.25), (0.123, -0.25), (0.068, 0.005)], colour)  # covers inner outlines
    if wear == "socks":
        pen.ellipse(0.015, -0.27, 0.108, 0.08, shade(colour, 0.8), start=180, end=360)  # toe cap
        return
    toes = (
        (-0.062, -0.35, 0.04),
        (0.0, -0.362, 0.028),
        (0.043, -0.348, 0.025),
        (0.08, -0.324, 0.022),
        (0.11, -0.29, 0.019),
    )
    for x, y, r in toes:
        pen.circle(x, y, r, colour, line, 0.004)
        pen.ellipse(x, y - r * 0.25, r * 0.55, r * 0.45, shade(skin, 1.1))  # nail


def _draw_feet(rng: random.Random, pen: Pen) -> tuple[str, dict[str, Any]]:
    ground = rng.choice(list(_GROUNDS))
    wear = rng.choice(["bare", "bare", "shoes", "socks"])
    skin_name, skin = pick(rng, SKIN)
    similar = {"tiles": ("white", "gray"), "sand": ("yellow", "white"), "grass": ("green",), "wood": ("brown",)}
    wear_name, wear_rgb = pick(rng, COLOURS, exclude=similar[ground]) if wear != "bare" else (None, skin)
    legs = rng.choice(["pants", "bare legs"])
    pants_name, pants = pick(rng, COLOURS, exclude=(wear_name, *similar[ground]))

    _draw_ground(rng, pen, ground)
    gap, y, scale = rng.uniform(0.1, 0.14), rng.uniform(0.62, 0.7), rng.uniform(0.95, 1.15)
    for side in (-1, 1):
        x = 0.5 + side * gap
        foot = pen.at(x, y, scale=scale, angle=side * rng.uniform(4, 12), mirror=side < 0)
        leg = pants if legs == "pants" else skin
        foot.capsule((0, 0.02), (0, 0.6), 0.06, wear_rgb if wear == "socks" else skin)
        if legs == "pants":
            foot.rect(-0.095, 0.12, 0.095, 0.7, leg, 0.02, shade(leg, 0.7), 0.006)
        _draw_foot(foot, wear, wear_rgb, skin)

    attrs = {
        "footwear": wear,
        "footwear_colour": wear_name,
        "skin": skin_name,
        "ground": ground,
        "legs": legs,
        "pants": pants_name if legs == "pants" else None,
    }
    subject = f"bare feet with {skin_name} skin" if wear == "bare" else f"feet in {wear_name} {wear}"
    caption = f"a close-up photo of {subject} {_GROUNDS[ground]}"
    return caption + (f", wearing {pants_name} pants" if legs == "pants" else ""), attrs


# --- scenes ---------------------------------------------------------------------------------------------

_PLACES = {"park": "in a park", "street": "on a street", "beach": "on a beach", "room": "in a room"}


def _draw_place(rng: random.Random, pen: Pen, place: str, horizon: float) -> None:
    if place == "room":
        backdrop(pen, jitter(rng, rng.choice([(225, 215, 190), (190, 210, 225), (220, 200, 200)])), 0, horizon, 1.05)
        pen.rect(-0.1, horizon, 1.1, 1.1, jitter(rng, (140, 95, 60)))
        wx = rng.uniform(0.1, 0.6)
        pen.rect(wx, 0.1, wx + 0.28, horizon - 0.12, (245, 245, 245))
        pen.rect(wx + 0.02, 0.12, wx + 0.26, horizon - 0.14, (150, 200, 240))
        pen.line([(wx + 0.14, 0.12), (wx + 0.14, horizon - 0.14)], (245, 245, 245), 0.015)
        return
    backdrop(pen, jitter(rng, (120, 175, 230)), 0, horizon, 1.15)
    if rng.random() < 0.5:
        pen.circle(rng.uniform(0.1, 0.9), rng.uniform(0.07, 0.18), 0.06, (250, 220, 90))
    for _ in range(rng.randint(0, 2)):
        x, y = rng.uniform(0, 1), rng.uniform(0.05, horizon - 0.15)
        for dx in (-0.05, 0.0, 0.05):
            pen.ellipse(x + dx, y - (0.02 if dx == 0 else 0), 0.05, 0.03, (248, 248, 248))
    ground = {"park": (80, 160, 70), "street": (150, 150, 150), "beach": (225, 200, 150)}[place]
    pen.rect(-0.1, horizon, 1.1, 1.1, jitter(rng, ground))
    if place == "beach":
        pen.rect(-0.1, horizon, 1.1, horizon + 0.07, jitter(rng, (40, 110, 190)))
    elif place == "street":
        for _ in range(6):
            x, w, top = rng.uniform(-0.1, 1.0), rng.uniform(0.12, 0.25), rng.uniform(0.1, horizon - 0.15)
            wall = jitter(rng, rng.choice([(180, 120, 90), (200, 190, 170), (150, 150, 165)]), 20)
            pen.rect(x, top, x + w, horizon, wall)
            for wy in range(int((horizon - top - 0.05) / 0.08)):
                for wx in range(int((w - 0.03) / 0.07)):
                    pen.rect(
                        x + 0.03 + wx * 0.07,
                        top + 0.04 + wy * 0.08,
                        x + 0.07 + wx * 0.07,
                        top + 0.09 + wy * 0.08,
                        (90, 120, 150),
                    )
        pen.rect(-0.1, horizon + 0.12, 1.1, horizon + 0.25, (90, 90, 95))
        for k in range(6):
            pen.rect(k / 5 - 0.05, horizon + 0.18, k / 5 + 0.03, horizon + 0.19, (240, 240, 240))
    else:
        for _ in range(rng.randint(1, 3)):
            x, s = rng.uniform(0.05, 0.95), rng.uniform(0.7, 1.1)
            pen.rect(x - 0.02 * s, horizon - 0.2 * s, x + 0.02 * s, horizon + 0.02, (100, 70, 40))
            for dx, dy in ((-0.06, -0.22), (0.06, -0.22), (0.0, -0.3)):
                pen.circle(x + dx * s, horizon + dy * s, 0.08 * s, jitter(rng, (50, 120, 50), 15))


def _draw_person(pen: Pen, who: str, skin: RGB, hair: RGB, top: RGB, bottom: RGB, dress: bool, pose: str) -> None:
    """A standing figure one unit tall, feet at the origin."""
    stride = 0.1 if pose == "walking" else 0.05
    legs = skin if dress else bottom
    for side in (-1, 1):
        pen.capsule((side * 0.045, -0.47), (side * stride, -0.04), 0.038, legs)
        pen.ellipse(side * stride + side * 0.02, -0.02, 0.05, 0.025, (40, 35, 35))
    if who == "woman":  # long hair behind the head and shoulders; the neck and head then cover its middle
        pen.rect(-0.1, -0.97, 0.1, -0.7, hair, 0.05)
    if dress:
        pen.poly([(-0.1, -0.78), (0.1, -0.78), (0.18, -0.3), (-0.18, -0.3)], top)
    else:
        pen.rect(-0.1, -0.78, 0.1, -0.44, top, 0.04)
    for side in (-1, 1):
        raised = pose == "waving" and side == 1
        hand = (0.24, -1.0) if raised else (side * (0.2 if pose == "walking" else 0.16), -0.47)
        pen.capsule((side * 0.09, -0.75), hand, 0.032, top)
        pen.circle(hand[0], hand[1], 0.035, skin)
    pen.rect(-0.03, -0.83, 0.03, -0.76, skin)
    pen.circle(0, -0.88, 0.085, skin)
    pen.ellipse(0, -0.9, 0.088, 0.08, hair, start=180, end=360)
    for side in (-1, 1):
        pen.circle(side * 0.03, -0.88, 0.01, (25, 25, 25))
    pen.ellipse(0, -0.85, 0.03, 0.015, (150, 50, 50), start=0, end=180)


def _draw_scene(rng: random.Random, pen: Pen) -> tuple[str, dict[str, Any]]:
    place = rng.choice(list(_PLACES))
    count = rng.choice([1, 2, 2, 3])
    pose = rng.choice(["standing", "walking", "waving"])
    horizon = rng.uniform(0.42, 0.55)
    _draw_place(rng, pen, place, horizon)

    people: list[dict[str, Any]] = []
    slots = [(k + rng.uniform(0.25, 0.75)) / count for k in range(count)]
    for x in slots:
        who = rng.choice(["man", "woman", "child"])
        dress = who != "man" and rng.random() < 0.5
        top_name, top = pick(rng, COLOURS)
        bottom_name, bottom = pick(rng, COLOURS, exclude=(top_name,))
        feet_y = rng.uniform(horizon + 0.3, 0.95)
        height = min(0.95 * feet_y - 0.03, 0.35 + 0.6 * (feet_y - horizon)) * (0.65 if who == "child" else 1.0)
        person = {
            "person": who,
            "top": "dress" if dress else "shirt",
            "top_colour": top_name,
            "bottom": None if dress else ("shorts" if who == "child" else "pants"),
            "bottom_colour": None if dress else bottom_name,
            "x": round(x, 3),
            "y": round(feet_y, 3),
            "height": round(height, 3),
        }
        people.append(person)
        _, skin = pick(rng, SKIN)
        _, hair = pick(rng, HAIR, exclude=("gray", "white") if who == "child" else ())
        person["_draw"] = (skin, hair, top, bottom, dress)
    for person in sorted(people, key=lambda p: p["y"]):  # far first
        skin, hair, top, bottom, dress = person.pop("_draw")
        sub = pen.at(person["x"], person["y"], scale=person["height"], mirror=rng.random() < 0.5)
        _draw_person(sub, person["person"], skin, hair, top, bottom, dress, pose)

    def describe(p: dict[str, Any], full: bool) -> str:
        text = f"a {p['person']} in {article(p['top_colour'])} {p['top']}"
        return text + (f" and {p['bottom_colour']} {p['bottom']}" if full and p["bottom"] else "")

    if count == 1:
        caption = f"a photo of one person {pose} {_PLACES[place]}, {describe(people[0], True)}"
    else:
        number = {2: "two", 3: "three"}[count]
        caption = f"a photo of {number} people {pose} {_PLACES[place]}, {join([describe(p, False) for p in people])}"
    return caption, {"place": place, "pose": pose, "people": people}


# --- public API -----------------------------------------------------------------------------------------

#: kind -> drawing function ``(rng, pen) -> (caption, attributes)``.
KINDS: dict[str, Callable[[random.Random, Pen], tuple[str, dict[str, Any]]]] = {
    "faces": _draw_face,
    "hands": _draw_hand,
    "scenes": _draw_scene,
    "feet": _draw_feet,
}


def _check(kind: str, count: int, size: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic data kind {kind!r}; valid kinds: {', '.join(sorted(KINDS))}")
    if count < 1:
        raise ValueError(f"count must be at least 1, not {count}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be between {MIN_SIZE} and {MAX_SIZE} pixels, not {size}")


def draw_sample(kind: str, index: int, *, seed: int = 0, size: int = 64) -> tuple[Image.Image, str, dict[str, Any]]:
    """Sample ``index`` of (kind, seed): an RGB ``size``×``size`` image, its caption and its metadata."""
    _check(kind, 1, size)
    rng = random.Random(f"mole-synthetic/{GENERATOR_VERSION}/{kind}/{seed}/{index}")
    big = size * _SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), (255, 255, 255))
    caption, attributes = KINDS[kind](rng, Pen.for_canvas(ImageDraw.Draw(canvas), big))
    image = canvas.resize((size, size), Image.Resampling.LANCZOS)
    meta = {"source": "synthetic", "kind": kind, "seed": seed, "index": index, "attributes": attributes}
    return image, caption, meta


def generate(
    kind: str, count: int, *, seed: int = 0, size: int = 64
) -> Iterator[tuple[Image.Image, str, dict[str, Any]]]:
    """``count`` (image, caption, meta) triples of one kind, drawn lazily.

    Raises:
        ValueError: At the call, not at the first ``next``: unknown kind (the message lists the valid
            ones), ``count < 1``, or ``size`` outside 16–1024.
    """
    _check(kind, count, size)
    return (draw_sample(kind, index, seed=seed, size=size) for index in range(count))


def write_dataset(
    out_dir: str | os.PathLike[str],
    kind: str,
    count: int,
    *,
    seed: int = 0,
    size: int = 64,
    samples_per_shard: int = 256,
    overwrite: bool = False,
    extra_meta: dict | None = None,
) -> DatasetIndex:
    """Write ``count`` synthetic samples of ``kind`` as a mole-shards dataset; returns its index.

    ``extra_meta`` goes into the index's ``meta`` too (the tracking run that made it, for lineage).

    Raises:
        ValueError: See :func:`generate`. FileExistsError: ``out_dir`` holds a dataset and not ``overwrite``.
    """
    _check(kind, count, size)
    meta = {
        "generator": "mole.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "kind": kind,
        "count": count,
        "seed": seed,
        "size": size,
        **(extra_meta or {}),
    }
    with ShardWriter(
        out_dir,
        name=f"synthetic-{kind}",
        kind=kind,
        samples_per_shard=samples_per_shard,
        created_by="mole.data.synthetic",
        meta=meta,
        overwrite=overwrite,
    ) as writer:
        for index, (image, caption, sample_meta) in enumerate(generate(kind, count, seed=seed, size=size)):
            writer.write(image, caption, sample_meta, key=f"{index:09d}")
    assert writer.index is not None
    logger.info("wrote %d synthetic %s samples (seed %d, %dpx) to %s", count, kind, seed, size, out_dir)
    return writer.index
