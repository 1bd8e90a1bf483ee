"""Turning fetched bytes into pixels, with the checks that keep hostile files harmless.

The pixel limits are always applied before any pixel is decoded: the pixels of the image, and
the pixels the model's resize would make of it (a 1x20000 image resized to a short side of 256 is
256x5,120,000), checked from the header on every path, CPU and device alike; truncated or
undecodable files
fail as ``not_an_image``. JPEGs for a GPU stay encoded here: nvJPEG decodes them in batches.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2.functional import pil_to_tensor

from contract.errors import NotAnImage, TooLarge
from worker.jpeg import plain_jpeg_header

JPEG_MAGIC = b"\xff\xd8\xff"
# The DCT scalings libjpeg decodes at, largest first, as PIL's JpegImageFile.draft tries them.
DRAFT_SCALES = (8, 4, 2)


@dataclass(frozen=True)
class DecodePolicy:
    max_pixels: int
    # Shorter side, in pixels, that JPEG draft mode (DCT scaling) may reduce a large photo to;
    # None decodes at full size. Twice the model's resize keeps the final resize antialiased.
    draft_min_side: int | None = None
    # The model's resize (torchvision's resize_size: [short side] or [height, width]); () if none.
    resize_size: tuple[int, ...] = ()
    # Most pixels that resize may produce from one image; None leaves only max_pixels.
    max_resized_pixels: int | None = None


def resized_size(width: int, height: int, size: tuple[int, ...]) -> tuple[int, int]:
    """(width, height) after torchvision's resize to ``size``, computed as it computes it."""
    if len(size) == 2:
        return size[1], size[0]
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size[0], int(size[0] * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def check_resized(width: int, height: int, policy: DecodePolicy) -> None:
    """Refuse an image whose resize would make too many pixels: a thin one, whatever its bytes."""
    if not policy.resize_size or policy.max_resized_pixels is None:
        return
    new_w, new_h = resized_size(width, height, policy.resize_size)
    if new_w * new_h > policy.max_resized_pixels:
        raise TooLarge(
            f"image is {width}x{height}: resizing it to {policy.resize_size[0]} pixels on the "
            f"short side would make {new_w}x{new_h} = {new_w * new_h} pixels, over the limit of "
            f"{policy.max_resized_pixels} (aspect ratio too extreme)"
        )


def install_pixel_limit(max_pixels: int) -> None:
    """Make PIL itself refuse bombs too (it raises above twice this), once per process."""
    Image.MAX_IMAGE_PIXELS = max_pixels


def open_checked(data: bytes, policy: DecodePolicy) -> Image.Image:
    """Read only the header, and refuse what is not an image or has too many pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise TooLarge(f"image refused as a decompression bomb: {e}") from e
    except UnidentifiedImageError as e:
        raise NotAnImage(f"the {len(data)} bytes are not in any image format PIL reads") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise NotAnImage(f"the image header is corrupt: {e}") from e
    width, height = image.size
    if width * height > policy.max_pixels:
        raise TooLarge(f"image is {width}x{height}, over the limit of {policy.max_pixels} pixels")
    check_resized(width, height, policy)
    return image


def decode_rgb(data: bytes, policy: DecodePolicy) -> Image.Image:
    """Fully decode to RGB; JPEG draft mode first shrinks large photos cheaply in the DCT.

    A plain JPEG header (``worker.jpeg``) within the limits, in a file that ends with its EOI
    marker, goes straight to PIL's JPEG decoder (``decode_plain_jpeg``); every other file is
    opened by PIL and its refusals are PIL's (a file cut just before its EOI is one that PIL,
    reading in chunks, and one decoder call do not always judge alike)."""
    header = plain_jpeg_header(data) if has_end_marker(data) else None
    try:
        if header is not None and _within_pixel_limits(header[0] * header[1], policy):
            check_resized(header[0], header[1], policy)
            image = decode_plain_jpeg(data, *header, draft_side=policy.draft_min_side)
        else:
            image = open_checked(data, policy)
            if policy.draft_min_side and image.format == "JPEG":
                side = policy.draft_min_side
                image.draft("RGB", (side, side))
            image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise NotAnImage(f"image data is truncated or corrupt: {e}") from e


def decode_plain_jpeg(
    data: bytes, width: int, height: int, mode: str, draft_side: int | None
) -> Image.Image:
    """The pixels ``Image.open(data)``, ``draft("RGB", (draft_side, draft_side))`` and ``load()``
    give, from PIL's JPEG decoder called once on the whole file: PIL's header parse and tile
    loop cost a small image more than its decode (tests/test_decode.py compares the two).

    The draft scale is the one PIL's ``draft`` picks: the largest of 8, 4, 2 (else 1) that keeps
    both sides at least ``draft_side``; the size is each side divided by it, rounded up."""
    scale = 1
    if draft_side:
        fits = min(width // draft_side, height // draft_side)
        scale = next((s for s in DRAFT_SCALES if fits >= s), 1)
    size = (-(-width // scale), -(-height // scale))
    return Image.frombytes(mode, size, data, "jpeg", (mode, "", scale, 0))


def is_gpu_decodable(data: bytes, policy: DecodePolicy) -> bool:
    """A baseline/progressive RGB or greyscale JPEG that nvJPEG can take; checks limits too.

    A plain JPEG header within the pixel limits is read by a marker scan (``worker.jpeg``);
    every other file, and every refusal, goes through PIL as before."""
    header = plain_jpeg_header(data)
    if header is not None and _within_pixel_limits(header[0] * header[1], policy):
        check_resized(header[0], header[1], policy)
        return True
    image = open_checked(data, policy)
    return data.startswith(JPEG_MAGIC) and image.format == "JPEG" and image.mode in ("RGB", "L")


def _within_pixel_limits(pixels: int, policy: DecodePolicy) -> bool:
    """Below both the policy's limit and PIL's bomb warning: PIL would open it without a word."""
    pil_limit = Image.MAX_IMAGE_PIXELS
    return pixels <= policy.max_pixels and (pil_limit is None or pixels <= pil_limit)


def has_end_marker(data: bytes) -> bool:
    """A JPEG that ends with its EOI marker (trailing padding allowed): one cut short has none."""
    return data.startswith(JPEG_MAGIC) and data[-64:].rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")


def encoded_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def rgb_uint8(data: bytes, policy: DecodePolicy) -> torch.Tensor:
    """CHW uint8 pixels, for a device that normalises them itself."""
    return pil_to_tensor(decode_rgb(data, policy))
