"""The decode checks, from the header only: thin images whose resize would make billions of pixels
are refused before any pixel is decoded, on the CPU path and the device path alike."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
import torch
from PIL import Image
from torchvision.transforms._presets import ImageClassification
from torchvision.transforms.functional import resize as tv_resize

from contract.errors import NotAnImage, TooLarge
from worker.decode import (
    DecodePolicy,
    decode_plain_jpeg,
    decode_rgb,
    has_end_marker,
    is_gpu_decodable,
    resized_size,
    rgb_uint8,
)
from worker.jpeg import plain_jpeg_header

RESIZE = (256,)
POLICY = DecodePolicy(max_pixels=10**8, resize_size=RESIZE, max_resized_pixels=16_000_000)
# Every way a worker turns bytes into pixels: CPU decode, the nvJPEG check, device pixels.
PATHS: dict[str, Callable[[bytes, DecodePolicy], object]] = {
    "cpu": decode_rgb,
    "gpu-jpeg-check": is_gpu_decodable,
    "device-pixels": rgb_uint8,
}


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 30)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("size", [(1, 20_000), (20_000, 1), (3, 70_000)], ids=str)
@pytest.mark.parametrize("path", PATHS, ids=str)
def test_a_thin_image_is_refused_from_its_header_on_every_path(
    size: tuple[int, int], path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = png(*size)
    assert len(data) < 2000  # a kilobyte or so that would become gigabytes

    def no_decoding(self: Image.Image) -> None:
        raise AssertionError("pixels were decoded before the size check")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr(Image.Image, "convert", no_decoding)
    with pytest.raises(TooLarge, match="aspect ratio") as caught:
        PATHS[path](data, POLICY)
    assert f"{size[0]}x{size[1]}" in str(caught.value)


@pytest.mark.parametrize("size", [(200, 150), (150, 200), (256, 256), (1, 900), (900, 1)], ids=str)
def test_a_usual_or_small_image_still_decodes(size: tuple[int, int]) -> None:
    policy = DecodePolicy(max_pixels=10**8, resize_size=RESIZE, max_resized_pixels=256 * 256 * 900)
    assert decode_rgb(png(*size), policy).size == size


@pytest.mark.parametrize(
    ("size", "resize"),
    [((200, 150), 256), ((7, 1000), 256), ((1000, 7), 232), ((33, 17), 518), ((3, 3), 224)],
    ids=str,
)
def test_the_resize_computed_from_the_header_is_the_one_torchvision_makes(
    size: tuple[int, int], resize: int
) -> None:
    width, height = size
    transforms = ImageClassification(crop_size=8, resize_size=resize)
    out = tv_resize(torch.zeros(3, height, width), transforms.resize_size, antialias=True)
    assert resized_size(width, height, tuple(transforms.resize_size)) == (
        out.shape[-1],
        out.shape[-2],
    )


def test_an_rgb_image_is_decoded_without_a_copy_and_others_are_converted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    converted: list[str] = []
    convert = Image.Image.convert

    def counted(self: Image.Image, mode: str) -> Image.Image:
        converted.append(self.mode)
        return convert(self, mode)

    monkeypatch.setattr(Image.Image, "convert", counted)
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (90, 120, 30)).save(out, format="JPEG")
    assert decode_rgb(out.getvalue(), POLICY).mode == "RGB"
    grey = io.BytesIO()
    Image.new("L", (40, 30), 90).save(grey, format="PNG")
    assert decode_rgb(grey.getvalue(), POLICY).mode == "RGB"
    assert converted == ["L"]


def pil_decoded(data: bytes, draft_side: int | None) -> Image.Image:
    """A JPEG decoded as PIL decodes a file it opens: the reference for ``decode_plain_jpeg``."""
    image = Image.open(io.BytesIO(data))
    if draft_side:
        image.draft("RGB", (draft_side, draft_side))
    image.load()
    return image


def noise_jpeg(size: tuple[int, int], mode: str, **options: object) -> bytes:
    generator = torch.Generator().manual_seed(size[0] * 7 + size[1])
    pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=generator)
    out = io.BytesIO()
    Image.fromarray(pixels.numpy()).convert(mode).save(out, format="JPEG", **options)
    return out.getvalue()


@pytest.mark.parametrize("draft_side", [None, 32, 64, 200], ids=str)
@pytest.mark.parametrize("options", [{}, {"progressive": True}, {"subsampling": 0}], ids=str)
@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("size", [(64, 48), (500, 375), (1001, 333), (17, 900)], ids=str)
def test_a_plain_jpeg_decodes_to_the_pixels_pil_gives_when_it_opens_the_file(
    size: tuple[int, int], mode: str, options: dict[str, object], draft_side: int | None
) -> None:
    data = noise_jpeg(size, mode, **options)
    header = plain_jpeg_header(data)
    assert header == (*size, mode)
    fast = decode_plain_jpeg(data, *header, draft_side=draft_side)
    slow = pil_decoded(data, draft_side)
    assert (fast.mode, fast.size) == (slow.mode, slow.size)
    assert fast.tobytes() == slow.tobytes()


@pytest.mark.parametrize("cut", [0.3, 0.7, 0.99])
def test_a_plain_jpeg_cut_short_is_not_an_image(cut: float) -> None:
    data = noise_jpeg((200, 150), "RGB")
    short = data[: int(len(data) * cut)]
    assert plain_jpeg_header(short) is not None  # the header survives: the decoder must refuse
    with pytest.raises(NotAnImage, match="truncated or corrupt"):
        decode_rgb(short, POLICY)


def _verdict(decode: Callable[[], Image.Image]) -> tuple[str, bytes]:
    """("ok", the RGB pixels) or ("refused", b"")."""
    try:
        return "ok", decode().convert("RGB").tobytes()
    except (OSError, ValueError, NotAnImage):
        return "refused", b""


@pytest.mark.parametrize("cut", [1, 2, 3])
@pytest.mark.parametrize(("size", "mode"), [((1001, 777), "RGB"), ((641, 1135), "L")], ids=str)
def test_a_plain_jpeg_without_its_end_marker_gets_pils_verdict(
    size: tuple[int, int], mode: str, cut: int
) -> None:
    # PIL reads a file in chunks and one decoder call takes it whole: where the EOI marker is
    # gone the two do not always agree (one decoder call takes the 641x1135 file cut by 1 or 2
    # bytes, PIL refuses it), so such a file is left to PIL.
    data = noise_jpeg(size, mode)[:-cut]
    assert plain_jpeg_header(data) is not None and not has_end_marker(data)
    assert _verdict(lambda: decode_rgb(data, POLICY)) == _verdict(lambda: pil_decoded(data, None))
