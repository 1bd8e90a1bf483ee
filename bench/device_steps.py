"""The device's two batch steps alone: the batched resize, and the forward pass eager vs graphed.

``python -m bench.device_steps --out steps.json [--device cuda] [--quick]``

resize   decoded images already on the device, uniform (ImageNet-size) and mixed sizes:
         ``roi_align`` calls and milliseconds per batch for worker.resize, beside the previous
         way (the weights' transforms once per distinct shape) for comparison.
forward  ``Classifier.predict`` on ready inputs at the full batch size, with and without CUDA
         graphs (graphs only on CUDA), milliseconds per batch, alone and beside ``--busy``
         Python threads doing the worker's per-image header checks (bench.gil_probe's load):
         eager launches must win the GIL back from them for every kernel, a graph replay once.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.models import get_model_weights

from bench.gil_probe import with_busy_threads
from bench.images import IMAGENET, ImageSet, image_pool
from bench.mixed_images import MIXED, MixedImageSet
from bench.report import save
from worker import resize
from worker.inference import Classifier, pick_dtype
from worker.models import load_model
from worker.settings import Settings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ms_per_call(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    fn()  # warm: allocator, cuDNN, first-call set-up
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync(device)
    return (time.perf_counter() - started) / repeat * 1000


def _decoded(paths: list[Path], device: torch.device) -> list[torch.Tensor]:
    data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    return [decode_jpeg(d, mode=ImageReadMode.RGB).to(device) for d in data]


def _by_shape(images: list[torch.Tensor], transforms: torch.nn.Module) -> list[torch.Tensor]:
    """The previous way: the weights' transforms once per distinct image shape."""
    groups: dict[tuple[int, ...], list[torch.Tensor]] = defaultdict(list)
    for image in images:
        groups[tuple(image.shape)].append(image)
    return [transforms(torch.stack(group)) for group in groups.values()]


def resize_steps(
    images: list[torch.Tensor], model: str, device: torch.device, repeat: int
) -> dict[str, Any]:
    transforms = get_model_weights(model).DEFAULT.transforms().to(device)
    spec = resize.ResizeCrop.of(transforms)
    with mock.patch.object(resize, "roi_align", wraps=resize.roi_align) as roi_align:
        resize.resize_crop_normalize(images, spec)
    shapes = len({tuple(i.shape) for i in images})
    return {
        "batch": len(images),
        "roi_align_calls": roi_align.call_count,
        "batched_ms": _ms_per_call(
            lambda: resize.resize_crop_normalize(images, spec), device, repeat
        ),
        "by_shape_calls": shapes,
        "by_shape_ms": _ms_per_call(lambda: _by_shape(images, transforms), device, repeat),
    }


def forward_steps(
    model: str, device: torch.device, batch: int, repeat: int, busy: tuple[int, ...]
) -> dict[str, Any]:
    loaded = load_model(Settings(model=model, weights="none"))
    out: dict[str, Any] = {"batch": batch}
    # Graphs first: beside busy threads the eager pass may take the stage's whole time cap.
    for graphs in (True, False) if device.type == "cuda" else (False,):
        try:
            out.update(_forward(loaded, device, batch, repeat, busy, graphs))
        except Exception as e:  # graphs failing on a device is the finding
            out["graphs_error" if graphs else "eager_error"] = f"{type(e).__name__}: {e}"
            print("forward failed:", out, flush=True)
    return out


def _forward(
    loaded: Any, device: torch.device, batch: int, repeat: int, busy: tuple[int, ...], graphs: bool
) -> dict[str, float]:
    clf = Classifier(
        loaded,
        device,
        pick_dtype("auto", device),
        channels_last=True,
        compile=False,
        batch_size=batch,
        cuda_graphs=graphs,
    )
    clf.warmup()
    x = torch.randn(batch, 3, clf.crop, clf.crop, device=device, dtype=clf.dtype)
    out = {}
    for threads in busy:
        # Beside busy threads an eager pass can take 100 times longer: fewer repeats there.
        times = 3 if threads else repeat
        step = partial(_ms_per_call, partial(clf.predict, x, 5), device, times)
        name = ("graphs" if graphs else "eager") + (f"_busy{threads}" if threads else "") + "_ms"
        out[name] = with_busy_threads(threads, step)
        print("forward", name, round(out[name], 3), flush=True)
    return out


def run(args: argparse.Namespace, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    device = torch.device(args.device)
    root = args.image_dir or Path(tempfile.mkdtemp(prefix="imgcls-steps-"))
    sets: dict[str, ImageSet | MixedImageSet] = {"uniform": IMAGENET, "mixed": MIXED}
    report: dict[str, Any] = {"device": str(device), "model": args.model, "resize": {}}
    for name, spec in sets.items():
        images = _decoded(image_pool(root, spec, args.batch), device)
        report["resize"][name] = resize_steps(images, args.model, device, args.repeat)
        print(name, report["resize"][name], flush=True)
        save(report)
    report["forward"] = forward_steps(args.model, device, args.batch, args.repeat, args.busy)
    save(report)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.device_steps", description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument(
        "--busy",
        type=lambda t: tuple(int(x) for x in t.split(",")),
        default=(0, 4, 16),
        help="busy Python threads beside the forward pass, comma-separated",
    )
    p.add_argument("--image-dir", type=Path)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)

    run(args, partial(save, path=args.out) if args.out else lambda _: None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
