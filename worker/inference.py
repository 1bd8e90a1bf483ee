"""The warm model on its device: batched preprocessing on the device, forward, softmax, top-k."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from enum import Enum

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from worker.models import LoadedModel, ModelLoadError

log = logging.getLogger(__name__)

# Most pixels resized in one call (about 0.8 GB of float32 scratch on the device).
RESIZE_PIXEL_BUDGET = 64_000_000


class PayloadKind(str, Enum):
    """What a loaded image carries to the device."""

    READY = "ready"  # float pixels, already preprocessed (the CPU path)
    PIXELS = "pixels"  # uint8 pixels, resized and normalised on the device
    JPEG = "jpeg"  # encoded JPEG bytes, for nvJPEG on the device


@dataclass(frozen=True)
class Payload:
    kind: PayloadKind
    data: torch.Tensor


@dataclass(frozen=True)
class TopK:
    probabilities: list[float]
    indices: list[int]


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {requested}: CUDA is not available on this machine")
    return device


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


class Classifier:
    """Owns the model on one device. Called from one inference thread at a time."""

    def __init__(
        self,
        loaded: LoadedModel,
        device: torch.device,
        dtype: torch.dtype,
        *,
        channels_last: bool,
        compile: bool,
        batch_size: int,
        device_preprocess: bool | None = None,
    ) -> None:
        self.loaded = loaded
        self.device = device
        # Decode JPEGs and resize on the device itself (nvJPEG on a GPU); the default on CUDA.
        cuda = device.type == "cuda"
        self.device_preprocess = cuda if device_preprocess is None else device_preprocess
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.batch_size = batch_size
        # On a GPU (cuDNN autotunes each new shape) or compiled (each shape recompiles), batches
        # are padded to a few fixed sizes, all tuned at warm-up, never while serving.
        self.pad_sizes = _bucket_sizes(batch_size) if (device.type == "cuda" or compile) else ()
        self.transforms = loaded.transforms.to(device)
        module = loaded.module.to(device=device, dtype=dtype).to(memory_format=self.memory_format)
        self.module = torch.compile(module) if compile else module
        self.crop = loaded.transforms.crop_size[0]
        self._prep_stream = torch.cuda.Stream(device) if cuda else None

    def warmup(self) -> None:
        """A forward pass at every batch size served: tunes, compiles, allocates, and checks the
        label count."""
        for size in self.pad_sizes or (self.batch_size,):
            x = torch.zeros(size, 3, self.crop, self.crop, device=self.device)
            logits = self._forward(self._cast(x))
        if logits.shape[-1] != len(self.loaded.categories):
            raise ModelLoadError(
                f"model {self.loaded.name} outputs {logits.shape[-1]} classes but has "
                f"{len(self.loaded.categories)} labels: give --labels with one line per class"
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def make_batch(self, payloads: list[Payload]) -> tuple[torch.Tensor, dict[int, Exception]]:
        """One input batch on the device; items that fail here are returned by position.

        On a GPU this runs on a stream of its own, so decoding the next batch overlaps the
        forward pass of the current one; it returns once the batch is ready to use.
        """
        if self._prep_stream is None:
            return self._make_batch(payloads)
        with torch.cuda.stream(self._prep_stream):
            x, errors = self._make_batch(payloads)
        self._prep_stream.synchronize()
        x.record_stream(torch.cuda.default_stream(self.device))
        return x, errors

    def _make_batch(self, payloads: list[Payload]) -> tuple[torch.Tensor, dict[int, Exception]]:
        if not self.device_preprocess:
            return self._cast(torch.stack([p.data for p in payloads])), {}
        images, errors = self._to_device_pixels(payloads)
        good = [i for i in range(len(payloads)) if i not in errors]
        if not good:
            return torch.empty(0, 3, self.crop, self.crop, device=self.device), errors
        return self._cast(self._transform_by_shape([images[i] for i in good])), errors

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, k: int) -> list[TopK]:
        n = x.shape[0]
        size = next((s for s in self.pad_sizes if s >= n), n)
        if size > n:
            pad = x.new_zeros(size - n, *x.shape[1:])
            x = torch.cat([x, pad]).contiguous(memory_format=self.memory_format)
        probs = self._forward(x)[:n].float().softmax(dim=1)
        top = probs.topk(min(k, probs.shape[1]), dim=1)
        values, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()
        return [TopK(v, i) for v, i in zip(values, indices, strict=True)]

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.module(x)
        logits: torch.Tensor = getattr(out, "logits", out)
        return logits

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.to(dtype=self.dtype, memory_format=self.memory_format)

    def _to_device_pixels(
        self, payloads: list[Payload]
    ) -> tuple[dict[int, torch.Tensor], dict[int, Exception]]:
        images: dict[int, torch.Tensor] = {}
        errors: dict[int, Exception] = {}
        jpegs = [i for i, p in enumerate(payloads) if p.kind == PayloadKind.JPEG]
        for i, p in enumerate(payloads):
            if p.kind != PayloadKind.JPEG:
                images[i] = p.data.to(self.device, non_blocking=True)
        images.update(self._decode_jpegs(jpegs, payloads, errors))
        return images, errors

    def _decode_jpegs(
        self, positions: list[int], payloads: list[Payload], errors: dict[int, Exception]
    ) -> dict[int, torch.Tensor]:
        if not positions:
            return {}
        data = [payloads[i].data for i in positions]
        try:
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
            return dict(zip(positions, decoded, strict=True))
        except RuntimeError:
            log.info("batched nvJPEG decode failed; decoding %d images one by one", len(data))
        out = {}
        for i in positions:
            try:
                out[i] = decode_jpeg(payloads[i].data, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:
                out[i] = self._cpu_fallback(payloads[i].data, i, errors)
        return {i: t for i, t in out.items() if t is not None}

    def _cpu_fallback(
        self, data: torch.Tensor, i: int, errors: dict[int, Exception]
    ) -> torch.Tensor | None:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB).to(self.device)
        except RuntimeError as e:
            errors[i] = e
            return None

    def _transform_by_shape(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Resize and crop images of one shape together: one kernel per shape, not per image.

        Groups are cut to a pixel budget, since resizing works on a float copy of its input.
        """
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            groups[tuple(image.shape)].append(i)
        out = torch.empty(len(images), 3, self.crop, self.crop, device=self.device)
        for shape, members in groups.items():
            step = max(1, RESIZE_PIXEL_BUDGET // (shape[-1] * shape[-2]))
            for start in range(0, len(members), step):
                chunk = members[start : start + step]
                batch = torch.stack([images[i] for i in chunk])
                out[torch.tensor(chunk, device=self.device)] = self.transforms(batch)
        return out


def _bucket_sizes(batch_size: int) -> tuple[int, ...]:
    """Powers of two below ``batch_size``, then ``batch_size``: at most half a batch of padding."""
    sizes = [1 << i for i in range(batch_size.bit_length()) if 1 << i < batch_size]
    return (*sizes, batch_size)
