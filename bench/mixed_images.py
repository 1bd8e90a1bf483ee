"""A mixed-size image set: ImageNet-like photos whose sizes and aspect ratios differ image by image.

The benchmark's other sets have one size each, which hides what real traffic costs a device
path that works shape by shape. Here each image's size is drawn from its seed: the longer side
from ``min_side`` to ``max_side`` pixels, the aspect ratio up to ``max_aspect``, landscape or
portrait, so a pool is the same on every machine. The pixels are ``make_photo``'s.
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.images import IMAGE_SETS, ImageSet, image_pool, make_photo


@dataclass(frozen=True)
class MixedImageSet:
    """Photos of sizes drawn per seed within [min_side, max_side] on each side."""

    name: str
    min_side: int
    max_side: int
    max_aspect: float
    grain: float
    quality: int = 90

    @property
    def folder(self) -> str:
        return (
            f"{self.name}-{self.min_side}to{self.max_side}-a{self.max_aspect:g}"
            f"-g{self.grain:g}-q{self.quality}"
        )

    def spec(self, seed: int) -> ImageSet:
        """The one-size set of image ``seed``: its width and height."""
        rng = np.random.default_rng([seed, 0x313D])
        aspect = float(np.exp(rng.uniform(0.0, np.log(self.max_aspect))))
        longer = int(rng.integers(round(self.min_side * aspect), self.max_side + 1))
        shorter = max(self.min_side, round(longer / aspect))
        width, height = (longer, shorter) if rng.random() < 0.7 else (shorter, longer)
        return ImageSet(self.name, width, height, grain=self.grain, quality=self.quality)


# ImageNet validation images run from about 200 to 1,000 px a side, mostly 4:3 and 3:2.
MIXED = MixedImageSet("mixed", min_side=200, max_side=1000, max_aspect=2.2, grain=16)
ALL_IMAGE_SETS: dict[str, ImageSet | MixedImageSet] = {**IMAGE_SETS, MIXED.name: MIXED}


def _write_one(args: tuple[MixedImageSet, int, str]) -> None:
    spec, seed, path = args
    tmp = f"{path}.tmp"
    Path(tmp).write_bytes(make_photo(spec.spec(seed), seed))
    os.replace(tmp, path)


def mixed_pool(
    root: Path, spec: MixedImageSet, count: int, processes: int | None = None
) -> list[Path]:
    """``count`` images of ``spec`` under ``root``, generating only those missing."""
    folder = root / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img{i:05d}.jpg" for i in range(count)]
    missing = [(spec, i, str(p)) for i, p in enumerate(paths) if not p.exists()]
    workers = min(processes or os.cpu_count() or 1, len(missing))
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.map(_write_one, missing, chunksize=max(1, len(missing) // (4 * workers)))
    else:
        for args in missing:
            _write_one(args)
    return paths


def any_pool(root: Path, spec: ImageSet | MixedImageSet, count: int) -> list[Path]:
    """The pool of any set, mixed or of one size."""
    if isinstance(spec, MixedImageSet):
        return mixed_pool(root, spec, count)
    return image_pool(root, spec, count)
