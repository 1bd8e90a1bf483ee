"""JPEG decode alone, batched, on the device: torchvision's nvJPEG beside nvImageCodec.

``python -m bench.decode_steps --out decode.json [--device cuda] [--batch 256] [--quick]``

Each decoder gets the same compressed bytes (ImageNet-size, mixed-size and 12-MP sets, and the
ImageNet-size batch with one in eight, then every image re-encoded progressive) as one
batch call and must leave RGB uint8 images on the device; images per second and this process's
CPU milliseconds per image over ``repeat`` calls after a warm-up call. nvImageCodec is the
worker's own ``worker.nvdecode`` (``pip install 'imgcls[nvimgcodec]'``), measured with each of
its back-ends that loads: its default (hardware JPEG engines and CUDA), the hardware engines
alone and CUDA alone. A decoder that is missing or fails is reported with its
error, never left out silently. On a CPU only torchvision's CPU decoder runs, a rehearsal.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from bench.images import IMAGENET, PHONE_12MP, image_pool
from bench.mixed_images import MIXED
from bench.report import save
from worker.nvdecode import NvImageCodec

Decode = Callable[[list[bytes]], Sequence[Any]]


def torchvision_decoder(device: torch.device) -> Decode:
    def decode(batch: list[bytes]) -> Sequence[Any]:
        return decode_jpeg(_tensors(batch), mode=ImageReadMode.RGB, device=device)

    return decode


def nvimgcodec_decoders(device: torch.device) -> dict[str, Decode | str]:
    """The worker's nvImageCodec decoder with each back-end, or the reason it could not be made."""
    backends = {"nvimgcodec": None, "nvimgcodec-hw": "HW_GPU_ONLY", "nvimgcodec-cuda": "GPU_ONLY"}
    out: dict[str, Decode | str] = {}
    for name, backend in backends.items():
        started = time.perf_counter()
        try:
            out[name] = _nvimgcodec_decode(NvImageCodec(device, backend))
            print(f"{name} ready in {time.perf_counter() - started:.1f} s", flush=True)
        except Exception as e:  # a back-end this GPU lacks is a result
            out[name] = f"{type(e).__name__}: {e}"
    return out


def _nvimgcodec_decode(decoder: NvImageCodec) -> Decode:
    def decode(batch: list[bytes]) -> Sequence[Any]:
        images = decoder.decode(_tensors(batch))
        if any(i is None for i in images):
            raise RuntimeError(f"{sum(i is None for i in images)} of {len(images)} not decoded")
        return images

    return decode


def rates(
    decode: Decode, batch: list[bytes], device: torch.device, repeat: int
) -> dict[str, float]:
    """Images per second, and this process's CPU milliseconds per image (all its threads)."""
    decode(batch)  # warm: decoder state, buffers
    _sync(device)
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeat):
        decode(batch)
    _sync(device)
    n = len(batch) * repeat
    return {
        "img_s": round(n / (time.perf_counter() - started), 1),
        "cpu_ms_per_img": round((time.process_time() - cpu) / n * 1000, 3),
    }


def _tensors(batch: list[bytes]) -> list[torch.Tensor]:
    """The bytes as the worker hands them on: uint8 tensors over the same memory."""
    with warnings.catch_warnings():  # read-only bytes: the decoders only read them
        warnings.simplefilter("ignore", UserWarning)
        return [torch.frombuffer(b, dtype=torch.uint8) for b in batch]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(root: Path, spec: Any, size: int) -> list[bytes]:
    paths = image_pool(root, spec, min(size, 64))
    data = [p.read_bytes() for p in paths]
    return [data[i % len(data)] for i in range(size)]


def _progressive(batch: list[bytes], every: int) -> list[bytes]:
    """``batch`` with every ``every``-th image re-encoded as a progressive JPEG."""
    out = list(batch)
    for i in range(0, len(out), every):
        with Image.open(io.BytesIO(out[i])) as image:
            buf = io.BytesIO()
            image.save(buf, "JPEG", quality=90, progressive=True)
        out[i] = buf.getvalue()
    return out


def run(args: argparse.Namespace, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    device = torch.device(args.device)
    root = args.image_dir or Path(tempfile.mkdtemp(prefix="imgcls-decode-"))
    # Images first, before any decoder starts its threads and CUDA context (on the H200 a run
    # that made the decoders first printed nothing within its 45 s cap).
    started = time.perf_counter()
    batches = _batches(root, args.batch)
    print(f"images ready in {time.perf_counter() - started:.1f} s", flush=True)
    decoders: dict[str, Decode | str] = {"torchvision": torchvision_decoder(device)}
    if device.type == "cuda":
        decoders.update(nvimgcodec_decoders(device))
    report: dict[str, Any] = {"device": str(device), "decode": {}}
    for set_name, batch in batches.items():
        size = len(batch)
        row: dict[str, Any] = {}
        for name, decode in decoders.items():
            row[name] = _measure(decode, batch, device, args.repeat)
            print(f"decode {set_name} x{size} {name}: {row[name]}", flush=True)
            report["decode"][set_name] = {"batch": size, **row}
            save(report)
    return report


def _batches(root: Path, size: int) -> dict[str, list[bytes]]:
    sets = {"imagenet": (IMAGENET, size), "mixed": (MIXED, size)}
    sets["12mp"] = (PHONE_12MP, max(1, size // 8))
    batches = {name: _batch(root, spec, n) for name, (spec, n) in sets.items()}
    # Does a progressive JPEG stall a batch? One in eight, then all of them.
    batches["imagenet-1in8-progressive"] = _progressive(batches["imagenet"], 8)
    batches["imagenet-progressive"] = _progressive(batches["imagenet"], 1)
    return batches


def _measure(decode: Decode | str, batch: list[bytes], device: torch.device, repeat: int) -> Any:
    if isinstance(decode, str):
        return decode
    try:
        return rates(decode, batch, device, repeat)
    except Exception as e:  # a decoder that fails here is a finding, not a crash
        return f"{type(e).__name__}: {e}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.decode_steps", description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--image-dir", type=Path)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    run(args, partial(save, path=args.out) if args.out else lambda _: None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
