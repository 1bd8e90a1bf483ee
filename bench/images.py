"""Photo-like JPEGs generated on the spot, so every run measures the same pixels on any machine.

``make_photo`` adds film grain to ``demo.images``' smooth scene (the tests' ``make_jpeg``), which
gives files the size and entropy of real photos: a clean gradient compresses to a fifth of a real
photo's bytes and decodes much faster, which would flatter every figure.
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from demo.images import encode, make_jpeg, scene

__all__ = [
    "IMAGE_SETS",
    "ImageSet",
    "PhotoSet",
    "image_pool",
    "make_jpeg",
    "make_photo",
    "mean_bytes",
]

# Largest side the smooth scene is drawn at before being scaled up: a 12-MP scene drawn at full
# size costs seconds of numpy per image, and the grain added afterwards carries the detail.
SCENE_MAX_SIDE = 1024
# Side of the square grain tile repeated across the image.
GRAIN_TILE = 256


@dataclass(frozen=True)
class ImageSet:
    """One kind of input: a name for reports, the pixel size, and the grain that sets file size."""

    name: str
    width: int
    height: int
    grain: float
    quality: int = 90

    @property
    def folder(self) -> str:
        return f"{self.name}-{self.width}x{self.height}-g{self.grain:g}-q{self.quality}"

    def spec(self, seed: int) -> ImageSet:
        """Every image of a one-size set has the set's size."""
        return self


class PhotoSet(Protocol):
    """A set ``image_pool`` can generate: its folder name and each image's size by seed."""

    @property
    def folder(self) -> str: ...

    def spec(self, seed: int) -> ImageSet: ...


# ImageNet validation images average about 500x375 and 110 KB.
IMAGENET = ImageSet("imagenet", 500, 375, grain=16)
# A phone's 12-megapixel photo, about 3-4 MB.
PHONE_12MP = ImageSet("12mp", 4032, 3024, grain=8)
IMAGE_SETS = {s.name: s for s in (IMAGENET, PHONE_12MP)}


def make_photo(spec: ImageSet, seed: int) -> bytes:
    """A JPEG of ``spec``'s size with grain, so bytes and decode cost resemble a real photo."""
    rng = np.random.default_rng(seed)
    scale = min(1.0, SCENE_MAX_SIDE / max(spec.width, spec.height))
    small = (int(spec.width * scale), int(spec.height * scale))
    image = Image.fromarray(scene(*small, rng).clip(0, 255).astype("uint8"))
    if small != (spec.width, spec.height):
        image = image.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    return encode(Image.fromarray(_add_grain(np.asarray(image), spec.grain, rng)), spec.quality)


def _add_grain(pixels: np.ndarray, grain: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian grain from one repeated tile: a full-size noise field costs more than the JPEG."""
    height, width = pixels.shape[:2]
    tile = rng.normal(0, grain, (GRAIN_TILE, GRAIN_TILE, 3)).astype(np.int16)
    reps = (-(-height // GRAIN_TILE), -(-width // GRAIN_TILE), 1)
    noisy = pixels.astype(np.int16) + np.tile(tile, reps)[:height, :width]
    return noisy.clip(0, 255).astype(np.uint8)


def _write_one(args: tuple[PhotoSet, int, str]) -> None:
    spec, seed, path = args
    tmp = f"{path}.tmp"
    Path(tmp).write_bytes(make_photo(spec.spec(seed), seed))
    os.replace(tmp, path)


def image_pool(root: Path, spec: PhotoSet, count: int, processes: int | None = None) -> list[Path]:
    """``count`` distinct images of ``spec`` (one size or mixed) under ``root``, generating
    only those missing.

    Jobs cycle over this pool: the decode cost per job is the same as with distinct files, and
    generating tens of thousands of 12-MP photos would take longer than the benchmark itself.
    """
    folder = root / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img{i:05d}.jpg" for i in range(count)]
    missing = [(spec, i, str(p)) for i, p in enumerate(paths) if not p.exists()]
    workers = min(processes or os.cpu_count() or 1, len(missing))
    if workers > 1:
        # spawn: the parent may already hold torch's OpenMP threads, which fork does not survive.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.map(_write_one, missing, chunksize=max(1, len(missing) // (4 * workers)))
    else:
        for args in missing:
            _write_one(args)
    return paths


def mean_bytes(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths) / max(1, len(paths))
