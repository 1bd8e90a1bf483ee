"""The batched mixed-size resize (worker.resize) against the weights' own per-image transforms.

Tolerance, in normalised units (one 8-bit level is about 0.017): per image, a mean absolute
difference under 0.01 and 99% of values within 0.05. The rest are hard edges, where the
box-and-taps filter and the antialiased resize's triangle differ by up to about 0.3.
"""

from __future__ import annotations

import pytest
import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.models import get_model_weights

from bench.images import ImageSet, make_photo
from worker import resize
from worker.resize import (
    RESIZE_PIXEL_BUDGET,
    ResizeCrop,
    chunks_by_budget,
    resize_crop_normalize,
)

TRANSFORMS = get_model_weights("resnet18").DEFAULT.transforms()
SPEC = ResizeCrop.of(TRANSFORMS)
# (width, height): ImageNet-like, 12 MP, extreme aspect ratios both ways, near the resize size
# from both sides, upscales, square.
SIZES = [
    (500, 375),
    (640, 480),
    (300, 400),
    (4032, 3024),
    (3000, 250),
    (250, 3000),
    (201, 199),
    (64, 48),
    (1000, 1000),
    (257, 256),
]


def _image(width: int, height: int, seed: int) -> torch.Tensor:
    data = make_photo(ImageSet("test", width, height, grain=0), seed)
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    return [_image(w, h, seed) for seed, (w, h) in enumerate(SIZES)]


def _assert_close(x: torch.Tensor, reference: torch.Tensor) -> None:
    diff = (x - reference).abs().flatten(1)
    assert diff.mean(dim=1).max() < 0.01
    assert diff.quantile(0.99, dim=1).max() < 0.05


def test_mixed_sizes_match_the_weights_transforms_image_by_image(
    images: list[torch.Tensor],
) -> None:
    x = resize_crop_normalize(images, SPEC)
    reference = torch.stack([TRANSFORMS(img) for img in images])
    assert x.shape == reference.shape == (len(images), 3, SPEC.crop, SPEC.crop)
    _assert_close(x, reference)


def test_the_crop_window_is_where_resize_and_center_crop_put_it() -> None:
    # 256x512 resizes to 256x512 itself: the window is the centre 224x224, to the pixel.
    assert SPEC.box(256, 512) == (144.0, 16.0, 368.0, 240.0)
    image = torch.randint(0, 256, (3, 256, 512), dtype=torch.uint8)
    assert torch.allclose(resize_crop_normalize([image], SPEC), TRANSFORMS(image)[None], atol=1e-4)


def test_a_small_budget_splits_the_batch_into_chunks_with_the_same_result(
    images: list[torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    budget = 4_000_000
    chunks = chunks_by_budget(images, budget)
    assert sorted(i for chunk in chunks for i in chunk) == list(range(len(images)))
    for chunk in chunks:
        height = max(images[i].shape[-2] for i in chunk) + 1
        width = max(images[i].shape[-1] for i in chunk) + 1
        assert len(chunk) == 1 or len(chunk) * height * width <= budget
    calls: list[int] = []
    real = resize.roi_align

    def counting(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(resize, "roi_align", counting)
    whole = resize_crop_normalize(images, SPEC)
    split = resize_crop_normalize(images, SPEC, pixel_budget=budget)
    default = chunks_by_budget(images, RESIZE_PIXEL_BUDGET)
    assert calls == [len(chunk) for chunk in [*default, *chunks]]
    assert len(chunks) > len(default)
    assert torch.allclose(whole, split, atol=1e-5)


def test_a_12_megapixel_photo_does_not_pad_the_small_images_beside_it() -> None:
    small = [torch.zeros(3, 375, 500, dtype=torch.uint8)] * 8
    big = torch.zeros(3, 3024, 4032, dtype=torch.uint8)
    chunks = chunks_by_budget([big, *small], 3024 * 4032 * 2)
    assert chunks == [list(range(1, 9)), [0]]
