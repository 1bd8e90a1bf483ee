"""The benchmark's mixed-size image set: sizes within its range, varied, the same on every run."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from bench.images import ImageSet, image_pool
from bench.mixed_images import MIXED


def test_mixed_sizes_stay_in_range_vary_and_repeat() -> None:
    specs = [MIXED.spec(seed) for seed in range(200)]
    sides = [side for s in specs for side in (s.width, s.height)]
    assert min(sides) >= MIXED.min_side
    assert max(sides) <= MIXED.max_side
    assert len({(s.width, s.height) for s in specs}) > 150
    assert any(s.width > s.height for s in specs) and any(s.height > s.width for s in specs)
    assert max(max(s.width, s.height) / min(s.width, s.height) for s in specs) <= MIXED.max_aspect
    assert [MIXED.spec(seed) for seed in range(200)] == specs


def test_one_pool_writer_serves_mixed_and_one_size_sets(tmp_path: Path) -> None:
    small = ImageSet("small", 40, 30, grain=8)
    for spec in (MIXED, small):
        paths = image_pool(tmp_path, spec, 3, processes=1)
        sizes = [Image.open(p).size for p in paths]
        assert sizes == [(spec.spec(i).width, spec.spec(i).height) for i in range(3)]
