"""Does the fast path answer like the plain one? The service's GPU fp16 path against its fp32 CPU
path, on the same images with the same (seeded, random) weights.

``python -m bench.gpu_check --model resnet50 --out check.json``

Untrained torchvision weights shrink activations layer after layer (logits near 1e-9, flat
probabilities, denormal floats), which would make any comparison vacuous. So the random weights
are first calibrated: batch-norm statistics are measured on the images, which brings every
layer back to unit scale, and the state dict is saved to a file that both sides load with the
worker's own ``--weights PATH`` path. Top-1 can still flip where the two best logits nearly tie,
so the report gives, besides top-1 agreement, top-5 overlap, the largest differences of logits
and probabilities and the median gap between the two best logits, in three comparisons:

    service_path  each side's own decode and preprocessing (CPU: PIL with JPEG draft mode;
                  GPU: nvJPEG and resizing on the device), then its own model
    model_only    the CPU side's input tensors through both models: precision alone
    inputs        the two sides' input tensors against each other: preprocessing, and the
                  rounding of the candidate's inputs to its precision

Without a GPU the candidate is the CPU in bf16, so the check still runs end to end.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
from PIL import Image
from torchvision.models import get_model, get_model_weights

from bench.ceiling import InProcess
from bench.config import TOP_K, default_options
from bench.images import image_pool
from bench.mixed_images import ALL_IMAGE_SETS
from worker.inference import Classifier
from worker.pipeline import WorkItem

# Seed of the random weights.
WEIGHTS_SEED = 0
# Images whose batch-norm statistics calibrate the random weights.
CALIBRATION_IMAGES = 32
# Images per device batch.
CHUNK = 32


@dataclass(frozen=True)
class Outputs:
    inputs: torch.Tensor  # float32, on the CPU
    logits: torch.Tensor  # float32, on the CPU


def calibrated_weights(model: str, paths: list[str], out: Path) -> Path:
    """Random weights with batch-norm statistics measured on ``paths``, saved as a state dict."""
    torch.manual_seed(WEIGHTS_SEED)
    module = get_model(model, weights=None).eval()
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the calibration batches
        norm.train()
    transforms = get_model_weights(model).DEFAULT.transforms()
    with torch.no_grad():
        for start in range(0, len(paths), 8):
            images = [Image.open(p).convert("RGB") for p in paths[start:][:8]]
            module(torch.stack([transforms(i) for i in images]))
    torch.save(module.eval().state_dict(), out)
    return out


def build(model: str, device: str, precision: str, root: Path, weights: Path) -> InProcess:
    """The worker's runtime on ``device``, loading ``weights`` as ``--weights PATH`` does."""
    options = default_options(device, precision=precision)
    settings = options.settings(model, "redis://127.0.0.1:1/0", (root,))
    return InProcess(replace(settings, weights=str(weights)))


def logits(clf: Classifier, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = clf.module(x.to(clf.device, dtype=clf.dtype, memory_format=clf.memory_format))
    return getattr(out, "logits", out).float().cpu()


def run_path(side: InProcess, uris: list[str]) -> Outputs:
    """Each image through the worker's own per-item and per-batch preparation, then the model."""
    inputs, outs = [], []
    jobs = side.jobs(uris, len(uris), TOP_K)
    for start in range(0, len(jobs), CHUNK):
        items = [WorkItem(job) for job in jobs[start : start + CHUNK]]
        for item in items:
            side.runtime.service.load_image(item)  # fetch, decode, preprocess: the worker's path
            if item.payload is None:
                raise RuntimeError(f"{item.job.uri}: {item.error}")
        x, errors = side.classifier.make_batch([i.payload for i in items if i.payload])
        if errors:
            raise RuntimeError(f"device preparation failed: {errors}")
        inputs.append(x.float().cpu())
        outs.append(logits(side.classifier, x))
    return Outputs(torch.cat(inputs), torch.cat(outs))


def compare(ref: torch.Tensor, cand: torch.Tensor) -> dict[str, Any]:
    """Agreement of two logit sets over the same images."""
    p_ref, p_cand = ref.softmax(1), cand.softmax(1)
    top_ref, top_cand = ref.topk(TOP_K, 1).indices, cand.topk(TOP_K, 1).indices
    pairs = zip(top_ref.tolist(), top_cand.tolist(), strict=True)
    overlap = [len(set(a) & set(b)) / TOP_K for a, b in pairs]
    return {
        "images": ref.shape[0],
        "top1_agreement": (top_ref[:, 0] == top_cand[:, 0]).float().mean().item(),
        "top5_overlap": sum(overlap) / len(overlap),
        "max_abs_logit_diff": (ref - cand).abs().max().item(),
        "max_abs_logit_ref": ref.abs().max().item(),
        "relative_logit_diff": ((ref - cand).abs().max() / ref.abs().max()).item(),
        "median_top2_gap": _top2_gap(ref),
        "max_abs_prob_diff": (p_ref - p_cand).abs().max().item(),
        "max_prob_ref": p_ref.max().item(),
        "nonfinite_candidate": int((~torch.isfinite(cand)).sum().item()),
    }


def _top2_gap(logits: torch.Tensor) -> float:
    best = logits.topk(2, dim=1).values
    return (best[:, 0] - best[:, 1]).median().item()


def check_set(ref: InProcess, cand: InProcess, uris: list[str]) -> dict[str, Any]:
    a, b = run_path(ref, uris), run_path(cand, uris)
    model_only = logits(cand.classifier, a.inputs)
    return {
        "service_path": compare(a.logits, b.logits),
        "model_only": compare(a.logits, model_only),
        "inputs": {
            "max_abs_diff": (a.inputs - b.inputs).abs().max().item(),
            "mean_abs_diff": (a.inputs - b.inputs).abs().mean().item(),
        },
    }


def _first_parameter(module: Any) -> torch.Tensor:
    """The module's first weights on the CPU (a compiled module is typed as a callable)."""
    return next(cast(torch.nn.Module, module).parameters()).detach().float().cpu()


def weights_match(ref: InProcess, cand: InProcess) -> bool:
    first = _first_parameter(ref.classifier.module)
    other = _first_parameter(cand.classifier.module)
    return first.shape == other.shape and torch.allclose(first, other, atol=1e-2, rtol=1e-2)


def check(model: str, device: str, precision: str, root: Path, sets: list[tuple[str, int]]) -> dict:
    pools = {s: [str(p) for p in image_pool(root, ALL_IMAGE_SETS[s], n)] for s, n in sets}
    calibration = [p for uris in pools.values() for p in uris][:CALIBRATION_IMAGES]
    weights = calibrated_weights(model, calibration, root / f"{model}-calibrated.pt")
    with (
        build(model, "cpu", "fp32", root, weights) as ref,
        build(model, device, precision, root, weights) as cand,
    ):
        return {
            "model": model,
            "reference": {"device": "cpu", "dtype": str(ref.classifier.dtype)},
            "candidate": {"device": device, "dtype": str(cand.classifier.dtype)},
            "weights": "random, batch-norm calibrated on the images",
            "weights_match": weights_match(ref, cand),
            "sets": {name: check_set(ref, cand, uris) for name, uris in pools.items()},
        }


def markdown(report: dict[str, Any]) -> str:
    """One table row per image set and comparison, for the run's summary."""
    ref, cand = report["reference"], report["candidate"]
    lines = [
        f"GPU check, {report['model']}: {cand['device']} {cand['dtype']} against {ref['device']} "
        f"{ref['dtype']} ({report['weights']}; weights match: {report['weights_match']}).",
        "",
        "| images | comparison | top-1 agree | top-5 overlap | max logit diff (relative) "
        "| max prob diff | median top-2 gap | input max diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, result in report["sets"].items():
        for kind in ("service_path", "model_only"):
            c = result[kind]
            lines.append(
                f"| {name} ({c['images']}) | {kind} | {c['top1_agreement']:.3f} "
                f"| {c['top5_overlap']:.3f} | {c['max_abs_logit_diff']:.3g} "
                f"({c['relative_logit_diff']:.2%}) | {c['max_abs_prob_diff']:.3g} "
                f"| {c['median_top2_gap']:.3g} | {result['inputs']['max_abs_diff']:.3g} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.summarize:
        print(markdown(json.loads(args.summarize.read_text())))
        return 0
    torch.set_flush_denormal(True)  # as workers do at setup: random weights make denormals
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = args.precision or ("fp16" if device.startswith("cuda") else "bf16")
    with tempfile.TemporaryDirectory(prefix="imgcls-check-") as tmp:
        root = (args.image_dir or Path(tmp)).resolve()
        report = check(args.model, device, precision, root, args.images)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


def _images(text: str) -> list[tuple[str, int]]:
    pairs = (item.split("=", 1) for item in text.split(",") if item)
    return [(name, int(count)) for name, count in pairs]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--images", type=_images, default=_images("imagenet=64,12mp=8"))
    p.add_argument("--image-dir", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--summarize", type=Path, help="print the table of a saved check and exit")
    return p


if __name__ == "__main__":
    sys.exit(main())
