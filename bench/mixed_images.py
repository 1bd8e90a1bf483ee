"""A mixed-size image set: ImageNet-like photos whose sizes and aspect ratios differ image by image.

The benchmark's other sets have one size each, which hides what real traffic costs a device
path that works shape by shape. Here each image's size is drawn from its seed: the longer side
from ``min_side`` to ``max_side`` pixels, the aspect ratio up to ``max_aspect``, landscape or
portrait, so a pool is the same on every machine. The pixels are ``make_photo``'s, and
``bench.images.image_pool`` writes a pool of either kind of set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.images import IMAGE_SETS, ImageSet


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
