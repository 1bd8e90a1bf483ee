"""Batched JPEG decode with nvImageCodec: the GPU's hardware JPEG engines and CUDA, not the CPU.

torchvision's batched nvJPEG decode runs each image's Huffman decoding on the calling CPU thread,
about a millisecond of CPU per ImageNet-size image; nvImageCodec hands baseline JPEGs to the
hardware engines (seven on an H100/H200) and the rest to CUDA, and releases the GIL meanwhile.
It is optional (``pip install 'imgcls[nvimgcodec]'``) and chosen with ``--jpeg-decoder
nvimgcodec``; an image it cannot decode comes back as None, and the caller decodes that one as
before (nvJPEG, then the CPU), so nothing is lost to it.
"""

from __future__ import annotations

from typing import Any

import torch

from worker.models import ModelLoadError


class NvImageCodec:
    """One nvImageCodec decoder for one CUDA device; called from one thread at a time."""

    def __init__(self, device: torch.device, backend: str | None = None) -> None:
        """``backend``: one nvImageCodec ``BackendKind`` name (``HW_GPU_ONLY``, ``GPU_ONLY``...)
        to use alone; None lets nvImageCodec choose per image."""
        if device.type != "cuda":
            raise ModelLoadError(f"--jpeg-decoder nvimgcodec needs a CUDA device, not {device}")
        try:
            from nvidia import nvimgcodec  # type: ignore[import-untyped,import-not-found,unused-ignore]
        except ImportError as e:
            raise ModelLoadError(
                "--jpeg-decoder nvimgcodec: nvImageCodec is not installed "
                "(pip install 'nvidia-nvimgcodec-cu13[nvjpeg]'), or use --jpeg-decoder torchvision"
            ) from e
        self.device = device
        self._codec: Any = nvimgcodec
        kind = None if backend is None else getattr(nvimgcodec.BackendKind, backend)
        backends = None if kind is None else [nvimgcodec.Backend(kind)]
        self._decoder = nvimgcodec.Decoder(device_id=device.index or 0, backends=backends)
        # As PIL and torchvision decode: RGB, interleaved, EXIF orientation not applied.
        self._params = nvimgcodec.DecodeParams(
            apply_exif_orientation=False,
            color_spec=nvimgcodec.ColorSpec.SRGB,
            sample_format=nvimgcodec.SampleFormat.I_RGB,
        )

    def decode(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """CHW uint8 images on the device, in the order of ``data`` (uint8 bytes on the host);
        None where an image could not be decoded. Ordered on the current CUDA stream."""
        streams = [self._code_stream(d) for d in data]
        parsed = [s for s in streams if s is not None]
        stream = torch.cuda.current_stream(self.device).cuda_stream
        decode = self._decoder.decode
        images = iter(decode(parsed, params=self._params, cuda_stream=stream) if parsed else [])
        return [None if s is None else self._chw(next(images)) for s in streams]

    def _code_stream(self, data: torch.Tensor) -> Any:
        """nvImageCodec's parse of one image's headers; None where it refuses them."""
        try:
            return self._codec.CodeStream(data.numpy())
        except Exception:  # its own exception types: the image goes the torchvision way
            return None

    def _chw(self, image: Any) -> torch.Tensor | None:
        if image is None:
            return None
        return torch.as_tensor(image, device=self.device).permute(2, 0, 1)
