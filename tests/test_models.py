"""Loading models the way an operator asks for them, with state dicts the tests save themselves."""

from __future__ import annotations

import functools
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from worker.inference import Classifier, fold_batch_norms
from worker.models import ModelLoadError, load_model
from worker.settings import Preprocess, Settings


def _settings(**kw: object) -> Settings:
    return Settings(**{"model": "resnet18", **kw})  # type: ignore[arg-type]


def _cached_default(torch_home: str, name: str = "resnet18") -> dict[str, torch.Tensor]:
    """Put a state dict where torchvision's DEFAULT weights would be cached after a download."""
    weights = torchvision.models.get_model_weights(name).DEFAULT
    state = torchvision.models.get_model(name, weights=None).state_dict()
    checkpoints = Path(torch_home) / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    torch.save(state, checkpoints / Path(weights.url).name)
    return state


def test_default_weights_load_from_the_torch_home_cache(torch_home: str) -> None:
    state = _cached_default(torch_home)
    loaded = load_model(_settings(weights="DEFAULT"))
    assert loaded.weights_id == "ResNet18_Weights.IMAGENET1K_V1"
    assert not loaded.random_weights
    assert torch.equal(loaded.module.state_dict()["fc.weight"], state["fc.weight"])
    assert len(loaded.categories) == 1000
    assert loaded.transforms.resize_size == [256]


def test_missing_default_weights_stop_the_worker_with_what_to_do(
    torch_home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ModelLoadError, match=r"checkpoints.*--weights none"):
        load_model(_settings(model="alexnet", weights="DEFAULT"))


def test_none_gives_random_weights_and_says_so() -> None:
    loaded = load_model(_settings(model="mobilenet_v3_small", weights="none"))
    assert loaded.random_weights
    assert loaded.weights_id == "none"
    assert loaded.categories[0] == "tench"


def test_a_state_dict_file_is_loaded_with_the_models_own_preprocessing(tmp_path: Path) -> None:
    state = torchvision.models.resnet18().state_dict()
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    loaded = load_model(_settings(weights=str(path)))
    assert torch.equal(loaded.module.state_dict()["conv1.weight"], state["conv1.weight"])
    assert loaded.weights_id.startswith(f"file:{path}#")


def test_a_state_dict_with_other_classes_needs_matching_labels(tmp_path: Path) -> None:
    path = tmp_path / "ten.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    with pytest.raises(ModelLoadError, match="does not fit resnet18 with 1000 classes"):
        load_model(_settings(weights=str(path)))
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class{i}" for i in range(10)))
    assert load_model(_settings(weights=str(path), labels=labels)).categories[9] == "class9"


class Payload:
    """Anything but tensors: torch.load(weights_only=True) must refuse to unpickle it."""


def test_weights_files_are_never_unpickled_beyond_tensors(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": Payload()}, path)
    with pytest.raises(ModelLoadError, match=r"not a state dict torch\.load can read safely"):
        load_model(_settings(weights=str(path)))


def test_unknown_model_names_are_refused_with_the_choices() -> None:
    with pytest.raises(ModelLoadError, match=r"not a torchvision classification model.*resnet50"):
        load_model(_settings(model="resnet5000"))


def test_every_registry_model_name_is_accepted() -> None:
    from worker.models import classification_models

    names = classification_models()
    assert {"alexnet", "resnet50", "vgg16", "densenet121", "efficientnet_b0"} <= set(names)


class TwoClass(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x.mean(dim=(1, 2, 3)), -x.mean(dim=(1, 2, 3))], dim=1)


def test_a_torchscript_file_is_served_with_its_labels_and_preprocessing(tmp_path: Path) -> None:
    path, labels = tmp_path / "m.pt", tmp_path / "labels.txt"
    torch.jit.save(torch.jit.script(TwoClass()), path)
    labels.write_text("bright\ndark\n")
    settings = _settings(
        model="mine", model_file=path, labels=labels, preprocess=Preprocess(resize=64, crop=48)
    )
    loaded = load_model(settings)
    assert loaded.categories == ("bright", "dark")
    assert (loaded.transforms.resize_size, loaded.transforms.crop_size) == ([64], [48])
    assert loaded.weights_id.startswith("torchscript:m.pt#")


def test_a_model_whose_outputs_do_not_match_its_labels_fails_warmup(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(TwoClass()), path)
    loaded = load_model(_settings(model="mine", model_file=path))
    classifier = Classifier(
        loaded, torch.device("cpu"), torch.float32, channels_last=False, compile=False, batch_size=2
    )
    with pytest.raises(ModelLoadError, match="outputs 2 classes but has 1000 labels"):
        classifier.warmup()


class ValueBranch(nn.Module):
    """A convolution and batch norm that torch.fx cannot trace: control flow on a value."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y


def _randomised_batch_norms(module: nn.Module) -> nn.Module:
    """Running statistics and affine parameters away from their initial 0 and 1, as trained
    ones are, so that folding them changes the weights."""
    generator = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t in (m.running_mean, m.running_var, m.weight, m.bias):
                t.data = torch.rand(t.shape, generator=generator) + 0.5
    return module.eval()


def test_batch_norms_fold_into_convolutions_with_the_same_probabilities() -> None:
    model = _randomised_batch_norms(torchvision.models.resnet18(weights=None))
    folded = fold_batch_norms(model, "resnet18")
    assert not [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]  # a copy was folded
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected, got = model(x).softmax(1), folded(x).softmax(1)
    assert torch.allclose(got, expected, atol=1e-6)


def test_a_model_torch_fx_cannot_trace_or_a_torchscript_file_is_served_as_it_is() -> None:
    untraceable = ValueBranch().eval()
    assert fold_batch_norms(untraceable, "mine") is untraceable
    scripted = torch.jit.script(TwoClass().eval())
    assert fold_batch_norms(scripted, "mine") is scripted


def test_a_cpu_worker_folds_by_default_and_not_when_told() -> None:
    loaded = load_model(_settings(weights="none"))
    make = functools.partial(
        Classifier, loaded, torch.device("cpu"), torch.float32, compile=False, batch_size=2
    )
    folded, kept = make(channels_last=True, fold_batch_norm=True), make(channels_last=True)
    assert not [m for m in folded.module.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [m for m in kept.module.modules() if isinstance(m, nn.BatchNorm2d)]
    assert Settings(model="resnet18").fold_batch_norm
