"""Turning fetched bytes into pixels, with the checks that keep hostile files harmless.

The pixel limit is always applied before any pixel is decoded; truncated or undecodable files
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

JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class DecodePolicy:
    max_pixels: int
    # Shorter side, in pixels, that JPEG draft mode (DCT scaling) may reduce a large photo to;
    # None decodes at full size. Twice the model's resize keeps the final resize antialiased.
    draft_min_side: int | None = None


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
    return image


def decode_rgb(data: bytes, policy: DecodePolicy) -> Image.Image:
    """Fully decode to RGB; JPEG draft mode first shrinks large photos cheaply in the DCT."""
    image = open_checked(data, policy)
    if policy.draft_min_side and image.format == "JPEG":
        side = policy.draft_min_side
        image.draft("RGB", (side, side))
    try:
        image.load()
        return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise NotAnImage(f"image data is truncated or corrupt: {e}") from e


def is_gpu_decodable(data: bytes, policy: DecodePolicy) -> bool:
    """A baseline/progressive RGB or greyscale JPEG that nvJPEG can take; checks limits too."""
    image = open_checked(data, policy)
    return data.startswith(JPEG_MAGIC) and image.format == "JPEG" and image.mode in ("RGB", "L")


def encoded_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def rgb_uint8(data: bytes, policy: DecodePolicy) -> torch.Tensor:
    """CHW uint8 pixels, for a device that normalises them itself."""
    return pil_to_tensor(decode_rgb(data, policy))
