"""(a) The seed's naive loop: the textbook recipe, one image at a time, as the project began.

Deliberately unoptimised: PIL decode at full size, torchvision v1 transforms on the CPU, a
batch of one, and a host round trip per image. It is the baseline every ratio is against.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.models
from PIL import Image
from torchvision import transforms
from torchvision.models import get_model_weights

# Images run, untimed, before the clock starts (first-call allocation, lazy CUDA set-up).
WARMUP_IMAGES = 2


@dataclass(frozen=True)
class SeedResult:
    images: int
    seconds: float
    torch_threads: int
    cpu_ms_per_image: float

    @property
    def img_s(self) -> float:
        return self.images / self.seconds


def textbook_classifier(name: str, device: torch.device) -> Callable[[Path], str]:
    """``models.<name>(weights=None).eval()`` and the classic per-image function around it.

    Mean, std and labels come from the model's weights entry: the values the recipe prints.
    """
    weights = get_model_weights(name).DEFAULT
    reference = weights.transforms()
    categories = weights.meta["categories"]
    model = getattr(torchvision.models, name)(weights=None).eval().to(device)
    preprocess = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(mean=reference.mean, std=reference.std),
        ]
    )

    def classify(path: Path) -> str:
        image = Image.open(path).convert("RGB")
        batch = preprocess(image).unsqueeze(0).to(device)
        with torch.no_grad():
            output = model(batch)
        probabilities = torch.nn.functional.softmax(output[0], dim=0)
        return categories[int(probabilities.argmax())]

    return classify


def seed_loop(
    name: str, device: torch.device, paths: list[Path], seconds: float, max_images: int
) -> SeedResult:
    """Images per second of the textbook loop, stopping at ``seconds`` or ``max_images``."""
    torch.backends.cudnn.benchmark = False  # the textbook default; the ceiling stage turns it on
    classify = textbook_classifier(name, device)
    for path in paths[:WARMUP_IMAGES]:
        classify(path)
    started, cpu = time.perf_counter(), time.process_time()
    done = 0
    while done < max_images and (done == 0 or time.perf_counter() - started < seconds):
        classify(paths[done % len(paths)])
        done += 1
    cpu_ms = 1000 * (time.process_time() - cpu) / done
    return SeedResult(done, time.perf_counter() - started, torch.get_num_threads(), cpu_ms)
