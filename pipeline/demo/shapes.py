"""The demo model's world: coloured shapes at positions on plain backgrounds, and a caption grammar.

The demo model (``demo_model.py``) learns from images drawn here, and its fidelity test measures what it
draws against the same definitions, so colours, shapes, positions and the held-out combinations live in
one place. Images are 32x32 RGB; a shape is 12-15 px across, centred on its position's anchor point
give or take 2 px.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
SUPERSAMPLE = 4  # drawn 4x larger then shrunk, for anti-aliased edges

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (240, 210, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (150, 60, 200),
}
SHAPES = ("circle", "square", "triangle")
# name -> (caption phrase, anchor point (x, y) in pixels)
POSITIONS: dict[str, tuple[str, tuple[int, int]]] = {
    "left": ("on the left", (9, 16)),
    "right": ("on the right", (23, 16)),
    "top": ("at the top", (16, 9)),
    "bottom": ("at the bottom", (16, 23)),
    "center": ("in the center", (16, 16)),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "grey": (128, 128, 128),
}


class Scene(NamedTuple):
    colour: str
    shape: str
    position: str
    background: str


def _held_out() -> frozenset[tuple[str, str, str]]:
    """Colour x shape x position triples never shown in training: one per (colour, shape) pair's diagonal.

    Triple (c, s, p) is held out when ``(c + 2s + p) % 5 == 0`` over the index of each: that picks 15 of
    the 75 triples (one position for each colour x shape pair), while every pair of the three (colour and
    shape, colour and position, shape and position) still appears in training, so the model must compose.
    """
    picks = itertools.product(enumerate(COLOURS), enumerate(SHAPES), enumerate(POSITIONS))
    return frozenset((c, s, p) for (ci, c), (si, s), (pi, p) in picks if (ci + 2 * si + pi) % 5 == 0)


HELD_OUT = _held_out()


def scenes(held_out: bool) -> list[Scene]:
    """Every scene (on every background) whose triple is, or is not, held out of training."""
    return [
        Scene(c, s, p, b)
        for c, s, p, b in itertools.product(COLOURS, SHAPES, POSITIONS, BACKGROUNDS)
        if ((c, s, p) in HELD_OUT) == held_out
    ]


def caption(scene: Scene, with_background: bool = True) -> str:
    """The grammar: "a red circle on the left on a white background" (the background part optional)."""
    text = f"a {scene.colour} {scene.shape} {POSITIONS[scene.position][0]}"
    return f"{text} on a {scene.background} background" if with_background else text


def placement(scene: Scene, rng: np.random.Generator) -> tuple[tuple[float, float], float]:
    """The shape's centre and half-side (in 32x32 pixels), jittered by `rng` around its position."""
    (x, y), half = POSITIONS[scene.position][1], rng.uniform(6.0, 7.5)
    return (x + rng.uniform(-2, 2), y + rng.uniform(-2, 2)), half


def draw(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """The scene as a (32, 32, 3) uint8 array, with the shape's size and place jittered by `rng`."""
    centre, half = placement(scene, rng)
    return render(scene.shape, centre, half, COLOURS[scene.colour], BACKGROUNDS[scene.background])


def render(
    shape: str,
    centre: tuple[float, float],
    half: float,
    fill: tuple[int, ...],
    background: tuple[int, ...],
    size: int = SIZE,
) -> np.ndarray:
    """`shape` filling the square of half-side `half` around `centre` (pixel i spans [i, i + 1]), as a
    (`size`, `size`, 3) array: `centre` and `half` are in 32x32 pixels, so the same call at another size
    draws the same picture sharper (the super-resolution demo's ground truth)."""
    k, (x, y) = SUPERSAMPLE * size / SIZE, centre
    image = Image.new("RGB", (size * SUPERSAMPLE, size * SUPERSAMPLE), background)
    box = [k * (x - half), k * (y - half), k * (x + half), k * (y + half)]
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:  # an upright triangle filling its box
        pen.polygon([(box[0], box[3]), (box[2], box[3]), (k * x, box[1])], fill=fill)
    return np.asarray(image.resize((size, size), Image.Resampling.BOX))
