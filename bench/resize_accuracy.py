"""How closely the batched mixed-size resize (worker.resize) follows the seed's PIL path.

``python -m bench.resize_accuracy --model resnet18 --images 64 --out accuracy.json``

Reference: PIL decode, then the weights' transforms (Resize, CenterCrop, ToTensor, Normalize)
image by image. Candidate: torchvision's decode_jpeg, then ``resize_crop_normalize`` on the
whole batch. Both in fp32 on the CPU, through the same random weights, batch-norm calibrated on
the images (see bench/gpu_check.py), on the mixed-size set.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.models import get_model, get_model_weights

from bench.gpu_check import calibrated_weights, compare
from bench.images import image_pool
from bench.mixed_images import MIXED
from worker.resize import ResizeCrop, resize_crop_normalize


def inputs(paths: list[Path], model: str) -> dict[str, torch.Tensor]:
    """Input tensors of ``paths``: the reference (PIL), the candidate (batched), and the
    baseline (the weights' transforms on each decoded tensor, as the device path did before)."""
    transforms = get_model_weights(model).DEFAULT.transforms()
    data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    decoded = [decode_jpeg(d, mode=ImageReadMode.RGB) for d in data]
    return {
        "reference": torch.stack([transforms(Image.open(p).convert("RGB")) for p in paths]),
        "batched": resize_crop_normalize(decoded, ResizeCrop.of(transforms)),
        "per_image_tensor": torch.stack([transforms(image) for image in decoded]),
    }


def _against(reference: torch.Tensor, other: torch.Tensor, logits: dict) -> dict[str, Any]:
    diff = (reference - other).abs().flatten()
    return {
        "input_mean_abs_diff": diff.mean().item(),
        "input_p99_abs_diff": diff.kthvalue(int(0.99 * diff.numel())).values.item(),
        "input_max_abs_diff": diff.max().item(),
        "logits": logits,
    }


def measure(model: str, paths: list[Path], workdir: Path) -> dict[str, Any]:
    weights = calibrated_weights(model, [str(p) for p in paths], workdir / "calibrated.pt")
    module = get_model(model, weights=None).eval()
    module.load_state_dict(torch.load(weights, weights_only=True))
    tensors = inputs(paths, model)
    with torch.inference_mode():
        logits = {k: torch.cat([module(x) for x in v.split(16)]) for k, v in tensors.items()}
    ref = tensors["reference"]
    return {
        "model": model,
        "images": len(paths),
        "image_set": MIXED.folder,
        **{
            name: _against(ref, tensors[name], compare(logits["reference"], logits[name]))
            for name in ("batched", "per_image_tensor")
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.resize_accuracy", description=__doc__)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--image-dir", type=Path)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory(prefix="imgcls-accuracy-") as tmp:
        root = args.image_dir or Path(tmp)
        report = measure(args.model, image_pool(root, MIXED, args.images), Path(tmp))
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
