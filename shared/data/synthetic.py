"""The embedded default data set: labelled images drawn procedurally, at any resolution, with no files.

It exists so that every stage runs (and is tested) out of the box, and so that a generative model's class
conditioning can be seen by eye: class c has its own look,
    shape family   SHAPES[c mod 8]
    fill texture   TEXTURES[(c + c div 8) mod 4]   (the 32 first classes are distinct (shape, texture) pairs)
    hue            frac(c · φ), φ the golden ratio  (consecutive classes far apart on the colour wheel)
and each image draws its own position, size, rotation, shade and background from a generator seeded by
(seed, split, index), so image i of a split is the same on every machine, worker and run.
"""
from __future__ import annotations

import colorsys
import math
import zlib

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from shared.data.transforms import preprocess

GOLDEN_RATIO = (1 + math.sqrt(5)) / 2
SUPERSAMPLE = 4  # shapes are drawn at 4× and box-filtered down: anti-aliased edges at any resolution
DRAWN_CACHE_BYTES = 64 * 2 ** 20  # a split whose uint8 images fit keeps them once drawn (SyntheticImages)


def _regular_polygon(corners: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    """(corners, 2) vertices on a circle of `radius` around the origin."""
    angles = phase + 2 * math.pi * np.arange(corners) / corners
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return radii[:, None] * _regular_polygon(2 * points, phase=-math.pi / 2)


def _cross(half_width: float = 0.33) -> np.ndarray:
    w = half_width
    return np.array([(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1),
                     (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)], dtype=float)


DISC = _regular_polygon(64)
# Each shape is a list of (polygon in unit coordinates, paint): paint 1 adds to the mask, 0 cuts a hole in it.
SHAPES: dict[str, list[tuple[np.ndarray, int]]] = {
    "disc": [(DISC, 1)],
    "square": [(_regular_polygon(4, phase=math.pi / 4), 1)],
    "triangle": [(_regular_polygon(3, phase=-math.pi / 2), 1)],
    "ring": [(DISC, 1), (0.55 * DISC, 0)],
    "cross": [(_cross(), 1)],
    "star": [(_star(), 1)],
    "hexagon": [(_regular_polygon(6), 1)],
    "crescent": [(DISC, 1), (0.85 * DISC + np.array([0.45, 0.0]), 0)],
}
TEXTURES = ("solid", "striped", "checkered", "dotted")
TEXTURE_PERIOD = 0.5  # in units of the shape's radius: about four stripes across a shape at every size


def class_look(label: int) -> tuple[str, str, float]:
    """(shape, texture, hue) of a class."""
    shape = list(SHAPES)[label % len(SHAPES)]
    texture = TEXTURES[(label + label // len(SHAPES)) % len(TEXTURES)]
    hue = (label * GOLDEN_RATIO) % 1.0
    return shape, texture, hue


def _texture(texture: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Blend weight in [0, 1] between the light and the dark class colour at local shape coordinates (u, v)."""
    if texture == "solid":  # a soft radial shading, no pattern
        return np.clip(np.hypot(u, v), 0.0, 1.0) ** 2
    cells_u, cells_v = np.floor(u / TEXTURE_PERIOD), np.floor(v / TEXTURE_PERIOD)
    if texture == "striped":
        return (cells_u % 2).astype(float)
    if texture == "checkered":
        return ((cells_u + cells_v) % 2).astype(float)
    if texture == "dotted":
        du = u / TEXTURE_PERIOD - cells_u - 0.5
        dv = v / TEXTURE_PERIOD - cells_v - 0.5
        return (np.hypot(du, dv) < 0.3).astype(float)
    raise ValueError(f"unknown texture {texture!r}")


def _rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value))


def draw_image(label: int, resolution: int, rng: np.random.Generator) -> Image.Image:
    """One resolution × resolution RGB image of class `label`, its variations drawn from `rng`."""
    shape, texture, hue = class_look(label)
    centre = rng.uniform(0.35, 0.65, size=2) * resolution
    radius = rng.uniform(0.22, 0.38) * resolution
    angle = rng.uniform(0, 2 * math.pi)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])

    # Coverage of the shape in [0, 1], (H, W): polygons drawn at SUPERSAMPLE× and box-filtered down.
    mask = Image.new("L", (resolution * SUPERSAMPLE, resolution * SUPERSAMPLE), 0)
    pen = ImageDraw.Draw(mask)
    for polygon, paint in SHAPES[shape]:
        vertices = (centre + radius * polygon @ rotation.T) * SUPERSAMPLE
        pen.polygon([tuple(p) for p in vertices], fill=255 * paint)
    coverage = np.asarray(mask.resize((resolution, resolution), Image.Resampling.BOX), dtype=float)[..., None]
    coverage /= 255

    # Pixel centres in the shape's own frame (u, v) = R^T (xy - centre) / radius, so textures turn with the shape.
    ys, xs = np.mgrid[0:resolution, 0:resolution] + 0.5
    offsets = np.stack([xs - centre[0], ys - centre[1]], axis=-1) @ rotation / radius
    shade = rng.uniform(-0.03, 0.03)
    light = _rgb(hue + shade, 0.85, 0.95)
    dark = _rgb(hue + shade, 0.9, 0.5)
    blend = _texture(texture, offsets[..., 0], offsets[..., 1])[..., None]
    foreground = (1 - blend) * light + blend * dark  # (H, W, 3)

    # A greyish background with a linear gradient in a random direction, so that the class is in the object only.
    base = _rgb(rng.uniform(0, 1), rng.uniform(0.0, 0.25), rng.uniform(0.2, 0.85))
    direction = rng.normal(size=2)
    ramp = (np.stack([xs, ys], axis=-1) / resolution - 0.5) @ (direction / np.linalg.norm(direction))  # (H, W)
    background = np.clip(base * (1 + 0.4 * ramp[..., None]), 0, 1)

    pixels = (1 - coverage) * background + coverage * foreground
    return Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="RGB")


class SyntheticImages(Dataset):
    """`num_images` procedurally drawn images of one split; image i has label i mod num_classes.

    `dataset[i]` or `dataset[(i, flip)]` → {"image": (3, R, R) float in [-1, 1], "label": int}.
    """

    def __init__(self, num_images: int, resolution: int, num_classes: int = 10, seed: int = 0, split: str = "train"):
        if num_images <= 0 or resolution <= 0 or num_classes <= 0:
            raise ValueError("num_images, resolution and num_classes must be positive")
        self.num_images, self.resolution, self.num_classes = num_images, resolution, num_classes
        self.seed, self.split = seed, split
        self._split_key = zlib.crc32(split.encode())  # stable across processes, unlike hash()
        self.class_names = [f"{texture} {shape} (hue {hue:.2f})"
                            for shape, texture, hue in map(class_look, range(num_classes))]
        # Drawing an image costs milliseconds, a training step reads 16-64 of them, and every epoch draws the same
        # ones again: a split that fits in DRAWN_CACHE_BYTES keeps what it has drawn.
        fits = num_images * resolution * resolution * 3 <= DRAWN_CACHE_BYTES
        self._drawn: dict[int, Image.Image] | None = {} if fits else None

    def __len__(self) -> int:
        return self.num_images

    def draw(self, index: int) -> tuple[Image.Image, int]:
        """Image `index` of the split as a PIL image, and its label."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        label = index % self.num_classes
        if self._drawn is not None and index in self._drawn:
            return self._drawn[index], label
        rng = np.random.default_rng([self.seed, self._split_key, index])
        image = draw_image(label, self.resolution, rng)
        if self._drawn is not None:
            self._drawn[index] = image
        return image, label

    def __getitem__(self, item: int | tuple[int, bool]) -> dict[str, torch.Tensor | int]:
        index, flip = item if isinstance(item, tuple) else (item, False)
        image, label = self.draw(index)
        return {"image": preprocess(image, self.resolution, flip), "label": label}
