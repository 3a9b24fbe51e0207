"""Shapes world: a deterministic synthetic captioning dataset whose ground truth says where each word is.

Each image holds one to three colored circles, squares or triangles on a textured background. The caption
names them left to right ("a red circle and a blue square"), and every object comes with its box
`(x0, y0, x1, y1)` in pixels, half-open: pixel `(row, col)` lies in the box when `x0 <= col < x1` and
`y0 <= row < y1`. Sizes are `(height, width)`; square and non-square images work alike.

Scene `index` of dataset `seed` depends on `(seed, index, size)` only, so any subset can be regenerated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ..errors import AttnHookError


class DemoError(AttnHookError, ValueError):
    """A demo model, image or caption was asked for in a way the demo cannot serve."""


COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 30),
    "purple": (150, 50, 200),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ((64, 64), (64, 96), (96, 64))  # (height, width) used in training
MIN_SIDE, MAX_SIDE = 14, 22  # object side in pixels
_GAP = 2  # pixels kept free between two objects
_DX = 8  # the centers of two objects differ by at least this many pixels horizontally


@dataclass(frozen=True)
class Shape:
    """One object of a scene: its color word, its shape word, its box `(x0, y0, x1, y1)` in pixels."""

    color: str
    shape: str
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Scene:
    """One image `(H, W, 3)` uint8 and its objects, ordered left to right by box center."""

    image: np.ndarray
    objects: tuple[Shape, ...]

    @property
    def caption(self) -> str:
        """The ground-truth caption, e.g. `"a red circle and a blue square"`."""
        return " and ".join(f"a {o.color} {o.shape}" for o in self.objects)

    @property
    def word_boxes(self) -> list[tuple[int, int, int, int] | None]:
        """For each word of the caption, the box of the object it names (color and shape words) or None."""
        boxes: list = []
        for i, o in enumerate(self.objects):
            boxes += ([None] if i else []) + [None, o.box, o.box]  # ["and"], "a", color, shape
        return boxes


def make_scene(seed: int, index: int, size: tuple[int, int] = (64, 64)) -> Scene:
    """Scene number `index` of dataset `seed`, an image of `size = (height, width)`.

    Example:
        >>> scene = make_scene(0, 7, size=(64, 96))
        >>> scene.image.shape, scene.image.dtype
        ((64, 96, 3), dtype('uint8'))
        >>> len(scene.caption.split()) == len(scene.word_boxes)
        True
    """
    height, width = _check_size(size)
    rng = np.random.default_rng([seed, index, height, width])
    image = _background(rng, height, width)
    objects = _place(rng, int(rng.integers(1, 4)), height, width)
    draw = ImageDraw.Draw(image)
    for o in objects:
        x0, y0, x1, y1 = o.box
        fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLORS[o.color])
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:  # pointing up; the tip is the top row's middle
            draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=fill)
    return Scene(np.asarray(image), objects)


def make_images(n: int, seed: int = 0, size: tuple[int, int] = (64, 64), start: int = 0) -> list[Scene]:
    """Scenes `start .. start + n - 1` of dataset `seed`, all of `size = (height, width)`.

    Example:
        >>> scenes = make_images(4, seed=1, size=(96, 64))
        >>> stack(scenes).shape                                  # (batch, H, W, 3)
        (4, 96, 64, 3)
        >>> make_images(1, seed=1, size=(96, 64), start=3)[0].caption == scenes[3].caption
        True
    """
    if not isinstance(n, int) or n < 0:
        raise DemoError(f"n must be a non-negative int, got {n!r}.")
    return [make_scene(seed, start + i, size) for i in range(n)]


def stack(scenes: list[Scene]) -> np.ndarray:
    """The images of `scenes` as one `(batch, H, W, 3)` uint8 array (all scenes must share a size).

    Example:
        >>> stack(make_images(2, size=(64, 96))).shape
        (2, 64, 96, 3)
    """
    sizes = {s.image.shape for s in scenes}
    if len(sizes) != 1:
        raise DemoError(f"stack() needs scenes of one size, got sizes {sorted(sizes)}. Make one batch per size.")
    return np.stack([s.image for s in scenes])


def _check_size(size) -> tuple[int, int]:
    if (not isinstance(size, (tuple, list)) or len(size) != 2 or not all(isinstance(v, int) for v in size)
            or min(size) < 32):
        raise DemoError(f"size must be (height, width) in pixels, each at least 32, got {size!r}.")
    return int(size[0]), int(size[1])


def _background(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Low-saturation texture: a tinted gray, waves of random direction and period, a second finer wave,
    and pixel noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = (rng.uniform(70, 160) + rng.uniform(-12, 12, size=3)).astype(np.float32)
    texture = np.zeros((height, width), np.float32)
    for amplitude in (rng.uniform(8, 22), rng.uniform(4, 10)):
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 16)
        phase = (x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi / period
        texture += amplitude * np.sin(phase + rng.uniform(0, 2 * np.pi))
    noise = (rng.random((height, width, 3), dtype=np.float32) - 0.5) * 16
    pixels = base + texture[..., None] + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _place(rng: np.random.Generator, count: int, height: int, width: int) -> tuple[Shape, ...]:
    """`count` objects with distinct (color, shape), non-overlapping boxes and horizontally distinct centers;
    fewer if the image is too crowded after many tries. Ordered left to right."""
    kinds = [(c, s) for c in COLORS for s in SHAPES]
    picks = rng.choice(len(kinds), size=count, replace=False)
    objects: list[Shape] = []
    for pick in picks:
        for _ in range(200):
            side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
            x0, y0 = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
            box = (x0, y0, x0 + side, y0 + side)
            if all(_apart(box, o.box) for o in objects):
                color, shape = kinds[pick]
                objects.append(Shape(color, shape, box))
                break
    return tuple(sorted(objects, key=lambda o: o.box[0] + o.box[2]))


def _apart(a: tuple, b: tuple) -> bool:
    overlap = (a[0] < b[2] + _GAP and b[0] < a[2] + _GAP and a[1] < b[3] + _GAP and b[1] < a[3] + _GAP)
    return not overlap and abs((a[0] + a[2]) - (b[0] + b[2])) >= 2 * _DX
