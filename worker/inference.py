"""The warm model on its device: batched preprocessing on the device, forward, softmax, top-k.

The batched mixed-size resize is in ``worker.resize``; the forward step and its CUDA graphs in
``worker.graphs``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from enum import Enum

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image
from torch.fx.experimental.optimization import fuse
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms._presets import ImageClassification

from worker.decode import resized_size
from worker.graphs import GRAPH_TOP_K, CudaGraphs, Step, make_step, unpack
from worker.models import LoadedModel, ModelLoadError
from worker.nvdecode import NvImageCodec
from worker.resize import ResizeCrop, resize_crop_normalize

log = logging.getLogger(__name__)


class PayloadKind(str, Enum):
    """What a loaded image carries to the device."""

    READY = "ready"  # float pixels, already preprocessed
    CROPPED = "cropped"  # uint8 HWC pixels resized and cropped on the CPU, normalised per batch
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
        cuda_graphs: bool = True,
        jpeg_decoder: str = "torchvision",
        fold_batch_norm: bool = False,
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
        module = loaded.module
        if fold_batch_norm and device.type == "cpu" and not compile:
            module = fold_batch_norms(module, loaded.name)
            self.loaded = replace(loaded, module=module)  # the unfolded copy is not kept
        module = module.to(device=device, dtype=dtype).to(memory_format=self.memory_format)
        self.module = torch.compile(module) if compile else module
        self.crop = loaded.transforms.crop_size[0]
        self.resize_spec = ResizeCrop.of(loaded.transforms)
        self._prep_stream = torch.cuda.Stream(device) if cuda else None
        # The forward pass as one replayed graph per padded size, captured at warm-up (CUDA only;
        # a compiled module is left to torch.compile).
        self.cuda_graphs = cuda and cuda_graphs and not compile
        self._graphs: CudaGraphs | None = None
        # JPEGs decoded by nvImageCodec instead of torchvision's nvJPEG (worker.nvdecode).
        self._nvdecode = NvImageCodec(device) if jpeg_decoder == "nvimgcodec" else None

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
        if self.cuda_graphs:
            self._capture_graphs()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def _capture_graphs(self) -> None:
        k = min(GRAPH_TOP_K, len(self.loaded.categories))
        self._graphs = CudaGraphs(self._step(k), self.pad_sizes, self._blank, k)

    def _blank(self, size: int) -> torch.Tensor:
        """A zero input batch of ``size`` in the model's dtype and memory format."""
        x = torch.zeros(size, 3, self.crop, self.crop, device=self.device, dtype=self.dtype)
        return x.contiguous(memory_format=self.memory_format)

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
            return self._cast(self._host_batch(payloads)), {}
        images, errors = self._to_device_pixels(payloads)
        good = [i for i in range(len(payloads)) if i not in errors]
        if not good:
            return torch.empty(0, 3, self.crop, self.crop, device=self.device), errors
        x = resize_crop_normalize([images[i] for i in good], self.resize_spec)
        return self._cast(x), errors

    def _host_batch(self, payloads: list[Payload]) -> torch.Tensor:
        """Stack the batch; cropped uint8 pixels are converted and normalised together, once."""
        cropped = [i for i, p in enumerate(payloads) if p.kind == PayloadKind.CROPPED]
        if not cropped:
            return torch.stack([p.data for p in payloads])
        pixels = torch.stack([payloads[i].data for i in cropped])
        normalised = normalize_batch(pixels, self.loaded.transforms)
        if len(cropped) == len(payloads):
            return normalised
        tensors = [p.data for p in payloads]
        for n, i in enumerate(cropped):
            tensors[i] = normalised[n]
        return torch.stack(tensors)

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, k: int) -> list[TopK]:
        """Top-k of each input: a replayed graph where one was captured for this k, else the
        same step run eagerly on the padded batch."""
        n = x.shape[0]
        k = min(k, len(self.loaded.categories))
        if self._graphs is not None and k <= self._graphs.k:
            packed = self._graphs.run(x)
        else:
            packed = self._step(k)(self._pad(x))[:n].cpu()
        return [TopK(v, i) for v, i in unpack(packed, k)]

    def _step(self, k: int) -> Step:
        return make_step(self.module, self.dtype, self.memory_format, k)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """x padded with zeros to the next of ``pad_sizes`` (shapes tuned at warm-up)."""
        n = x.shape[0]
        size = next((s for s in self.pad_sizes if s >= n), n)
        if size == n:
            return x
        pad = x.new_zeros(size - n, *x.shape[1:])
        return torch.cat([x, pad]).contiguous(memory_format=self.memory_format)

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
        if self._nvdecode is not None:
            pairs = list(zip(positions, self._nvdecode.decode(data), strict=True))
            out = {i: image for i, image in pairs if image is not None}
            rest = [i for i, image in pairs if image is None]
            return out | self._decode_one_by_one(rest, payloads, errors)
        try:
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
            return dict(zip(positions, decoded, strict=True))
        except RuntimeError:
            log.info("batched nvJPEG decode failed; decoding %d images one by one", len(data))
        return self._decode_one_by_one(positions, payloads, errors)

    def _decode_one_by_one(
        self, positions: list[int], payloads: list[Payload], errors: dict[int, Exception]
    ) -> dict[int, torch.Tensor]:
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


def fold_batch_norms(module: torch.nn.Module, name: str) -> torch.nn.Module:
    """A copy of ``module`` (in eval mode) with each batch norm that follows a convolution
    folded into the convolution's weights, which saves a pass over the activations (the peer
    benchmark's measure is in the README); ``module`` itself where nothing folds or
    torch.fx cannot trace it (a TorchScript file, control flow on values)."""
    if isinstance(module, torch.jit.ScriptModule):
        return module
    try:
        folded = fuse(module).eval()
    except Exception as e:  # tracing fails in many ways, with no common type
        log.info("model %s: batch norms not folded (%s: %s)", name, type(e).__name__, e)
        return module
    folds = _batch_norms(module) - _batch_norms(folded)
    if not folds:
        return module
    log.info("model %s: %d batch norms folded", name, folds)
    return folded


def _batch_norms(module: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())


def crop_on_host(image: Image.Image, transforms: ImageClassification) -> torch.Tensor:
    """The resize and centre crop of ``transforms`` (the first half of its ``forward``), as HWC
    uint8 pixels: converting and normalising them costs less once per batch (normalize_batch).

    The same two PIL calls torchvision's ``resize`` and ``center_crop`` make, and the same
    arithmetic, without their checks and logging (which cost twice the resize of a small
    image); a crop larger than the resized image (padding) is left to ``center_crop``."""
    size = tuple(transforms.resize_size)
    width, height = resized_size(image.width, image.height, size)
    image = image.resize((width, height), F.pil_modes_mapping[transforms.interpolation])
    crop = list(transforms.crop_size)
    crop_h, crop_w = crop if len(crop) == 2 else crop * 2
    if crop_w > width or crop_h > height:
        return torch.from_numpy(np.array(F.center_crop(image, transforms.crop_size)))
    # The crop sliced from the resized pixels: the same bytes as PIL's crop, without its Python
    # overhead; copied, so that a job holds only its crop, not the whole resized image.
    top, left = round((height - crop_h) / 2.0), round((width - crop_w) / 2.0)
    pixels = np.asarray(image)[top : top + crop_h, left : left + crop_w]
    return torch.from_numpy(np.ascontiguousarray(pixels))


def normalize_batch(pixels: torch.Tensor, transforms: ImageClassification) -> torch.Tensor:
    """NHWC uint8 to NCHW normalised floats (channels-last strides), computed as the second half
    of ``transforms.forward`` computes it per image (``convert_image_dtype``, ``normalize``),
    so every value is the same to the bit."""
    x = pixels.permute(0, 3, 1, 2).to(torch.float32) / 255.0
    mean = torch.as_tensor(transforms.mean, dtype=x.dtype).view(-1, 1, 1)
    std = torch.as_tensor(transforms.std, dtype=x.dtype).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


def _bucket_sizes(batch_size: int) -> tuple[int, ...]:
    """Powers of two below ``batch_size``, then ``batch_size``: at most half a batch of padding."""
    sizes = [1 << i for i in range(batch_size.bit_length()) if 1 << i < batch_size]
    return (*sizes, batch_size)
