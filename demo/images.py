"""Photo-like sample JPEGs generated on the spot: the demo's samples and the tests' images.

Smooth sine gradients plus a few filled discs, different for each seed. ``bench.images`` adds
film grain on top of the same scene to get the size and entropy of real photos.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def scene(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Float HxWx3 pixels: one sine gradient per channel and four filled discs."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy = rng.uniform(0.002, 0.03, 2).tolist()
        phase = rng.uniform(0, 6.28)
        channels.append(127 + 120 * np.sin(x * fx + y * fy + phase))
    pixels = np.stack(channels, axis=-1)
    for _ in range(4):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(10, 80)
        mask = (x - cx) ** 2 + (y - cy) ** 2 < r**2
        pixels[mask] = rng.integers(0, 255, 3)
    return pixels


def encode(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def make_jpeg(width: int = 500, height: int = 375, seed: int = 0, quality: int = 90) -> bytes:
    """A photo-like JPEG: smooth gradients plus a few shapes, different for each seed."""
    rng = np.random.default_rng(seed)
    pixels = scene(width, height, rng)
    return encode(Image.fromarray(pixels.clip(0, 255).astype("uint8")), quality)
