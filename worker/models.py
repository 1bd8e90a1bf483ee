"""Loading a classification model, its preprocessing and its labels, once per worker process.

torchvision's registry drives everything: ``get_model``, ``get_model_weights``,
``weights.transforms()`` and ``weights.meta["categories"]``. A TorchScript file is the one
exception, with ImageNet-style preprocessing from the settings.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.models
from torchvision.models import WeightsEnum, get_model, get_model_weights, list_models
from torchvision.transforms._presets import ImageClassification

from worker.settings import Preprocess, Settings

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model cannot be served; the message says why and what to do."""


@dataclass(frozen=True)
class LoadedModel:
    name: str
    module: torch.nn.Module
    transforms: ImageClassification
    categories: tuple[str, ...]
    weights_id: str
    random_weights: bool


def classification_models() -> list[str]:
    return list_models(module=torchvision.models)


def load_model(settings: Settings) -> LoadedModel:
    if settings.model_file is not None:
        return _load_torchscript(settings.model, settings.model_file, settings)
    return _load_torchvision(settings)


def _load_torchvision(settings: Settings) -> LoadedModel:
    name = settings.model
    if name not in classification_models():
        raise ModelLoadError(
            f"{name!r} is not a torchvision classification model; choose one of "
            f"{', '.join(classification_models())}, or serve your own with --model-file"
        )
    spec = settings.weights
    weights_enum = get_model_weights(name)
    if spec.lower() == "none":
        return _build_random(name, weights_enum.DEFAULT, settings.labels)
    if _is_weights_name(weights_enum, spec):
        return _build_pretrained(name, _weights_entry(weights_enum, spec), settings.labels)
    return _build_from_state_dict(name, weights_enum.DEFAULT, spec, settings.labels)


def _is_weights_name(weights_enum: type[WeightsEnum], spec: str) -> bool:
    return spec.upper() == "DEFAULT" or spec in weights_enum.__members__


def _weights_entry(weights_enum: type[WeightsEnum], spec: str) -> WeightsEnum:
    return weights_enum.DEFAULT if spec.upper() == "DEFAULT" else weights_enum[spec]


def _build_pretrained(name: str, weights: WeightsEnum, labels: Path | None) -> LoadedModel:
    try:
        module = get_model(name, weights=weights)
    except Exception as e:
        raise ModelLoadError(
            f"could not load pretrained weights {weights} for {name}: {e}. Without network access, "
            f"put {Path(weights.url).name} in {torch.hub.get_dir()}/checkpoints (TORCH_HOME), "
            "pass a state-dict file with --weights PATH, or --weights none for random weights"
        ) from e
    return _loaded(name, module, weights, labels, weights_id=str(weights), random=False)


def _build_random(name: str, reference: WeightsEnum, labels: Path | None) -> LoadedModel:
    categories = _categories(reference, labels)
    module = get_model(name, weights=None, num_classes=len(categories))
    log.warning("model %s has RANDOM weights: its predictions carry no meaning", name)
    return _loaded(name, module, reference, labels, weights_id="none", random=True)


def _build_from_state_dict(
    name: str, reference: WeightsEnum, source: str, labels: Path | None
) -> LoadedModel:
    blob = _read_weights_file(source)
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"{source} is not a state dict torch.load can read safely: {e}") from e
    categories = _categories(reference, labels)
    module = get_model(name, weights=None, num_classes=len(categories))
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(
            f"state dict {source} does not fit {name} with {len(categories)} classes: {e}. "
            "Check the model name, or give --labels with one line per class"
        ) from e
    digest = hashlib.sha256(blob).hexdigest()[:12]
    return _loaded(
        name, module, reference, labels, weights_id=f"file:{source}#{digest}", random=False
    )


def _read_weights_file(source: str) -> bytes:
    if source.startswith("s3://"):
        return _read_s3(source)
    path = Path(source)
    if not path.is_file():
        raise ModelLoadError(
            f"--weights {source!r} is neither DEFAULT, none, a weights name of the model, "
            "an existing state-dict file nor an s3:// URI"
        )
    return path.read_bytes()


def _read_s3(uri: str) -> bytes:
    import boto3

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    try:
        return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as e:
        raise ModelLoadError(f"could not read weights from {uri}: {e}") from e


def _categories(weights: WeightsEnum, labels: Path | None) -> tuple[str, ...]:
    if labels is None:
        return tuple(weights.meta["categories"])
    names = tuple(line.strip() for line in labels.read_text().splitlines() if line.strip())
    if not names:
        raise ModelLoadError(f"--labels {labels} has no labels: give one label per line")
    return names


def _loaded(
    name: str,
    module: torch.nn.Module,
    weights: WeightsEnum,
    labels: Path | None,
    *,
    weights_id: str,
    random: bool,
) -> LoadedModel:
    return LoadedModel(
        name=name,
        module=module.eval(),
        transforms=weights.transforms(),
        categories=_categories(weights, labels),
        weights_id=weights_id,
        random_weights=random,
    )


def _load_torchscript(name: str, path: Path, settings: Settings) -> LoadedModel:
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise ModelLoadError(f"{path} is not a TorchScript file (torch.jit.save): {e}") from e
    reference = torchvision.models.ResNet50_Weights.IMAGENET1K_V1
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return LoadedModel(
        name=name,
        module=module.eval(),
        transforms=_imagenet_style(settings.preprocess),
        categories=_categories(reference, settings.labels),
        weights_id=f"torchscript:{path.name}#{digest}",
        random_weights=False,
    )


def _imagenet_style(p: Preprocess) -> ImageClassification:
    return ImageClassification(crop_size=p.crop, resize_size=p.resize, mean=p.mean, std=p.std)
