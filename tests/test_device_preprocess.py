"""The GPU path's preprocessing (batched JPEG decode, resize by shape, normalise on the device),
run here on the CPU device: it must agree with the PIL path the seed's pipeline uses."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from tests.support import make_jpeg
from worker.decode import DecodePolicy, decode_rgb, encoded_tensor, rgb_uint8
from worker.inference import Classifier, Payload, PayloadKind
from worker.models import LoadedModel, load_model
from worker.settings import Settings

POLICY = DecodePolicy(max_pixels=10**8)


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model(Settings(model="resnet18", weights="none"))


def _classifier(loaded: LoadedModel, device_preprocess: bool) -> Classifier:
    return Classifier(
        loaded,
        torch.device("cpu"),
        torch.float32,
        channels_last=True,
        compile=False,
        batch_size=8,
        device_preprocess=device_preprocess,
    )


def _png(jpeg: bytes) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(out, format="PNG")
    return out.getvalue()


def test_device_preprocessing_matches_the_pil_path(loaded: LoadedModel) -> None:
    jpegs = [make_jpeg(500, 375, seed=1), make_jpeg(640, 480, seed=2), make_jpeg(500, 375, seed=3)]
    png = _png(make_jpeg(300, 400, seed=4))
    payloads = [Payload(PayloadKind.JPEG, encoded_tensor(j)) for j in jpegs]
    payloads.append(Payload(PayloadKind.PIXELS, rgb_uint8(png, POLICY)))
    x, errors = _classifier(loaded, True).make_batch(payloads)
    reference = torch.stack([loaded.transforms(decode_rgb(d, POLICY)) for d in [*jpegs, png]])
    assert errors == {}
    assert x.shape == reference.shape
    assert (x - reference).abs().mean() < 0.01
    assert torch.allclose(x, reference, atol=0.05)


def test_images_of_one_shape_are_resized_in_one_call(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    classifier = _classifier(loaded, True)
    calls: list[int] = []
    transforms = classifier.transforms

    def counting(batch: torch.Tensor) -> torch.Tensor:
        calls.append(batch.shape[0])
        return transforms(batch)

    monkeypatch.setattr(classifier, "transforms", counting)
    sizes = [(500, 375), (500, 375), (640, 480), (500, 375)]
    jpegs = [make_jpeg(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    classifier.make_batch([Payload(PayloadKind.JPEG, encoded_tensor(j)) for j in jpegs])
    assert sorted(calls) == [1, 3]


def test_a_corrupt_jpeg_fails_alone_on_the_device_path(loaded: LoadedModel) -> None:
    good, bad = make_jpeg(seed=1), make_jpeg(seed=2)[:2000]
    x, errors = _classifier(loaded, True).make_batch(
        [
            Payload(PayloadKind.JPEG, encoded_tensor(good)),
            Payload(PayloadKind.JPEG, encoded_tensor(bad)),
            Payload(PayloadKind.JPEG, encoded_tensor(good)),
        ]
    )
    assert list(errors) == [1]
    assert x.shape[0] == 2


def test_both_paths_give_the_same_top_class() -> None:
    torch.manual_seed(0)
    loaded = load_model(Settings(model="resnet18", weights="none"))
    with torch.no_grad():
        loaded.module.fc.weight.mul_(40)
    data = [make_jpeg(500, 375, seed=s) for s in range(4)]
    cpu = _classifier(loaded, False)
    dev = _classifier(loaded, True)
    host_inputs, _ = cpu.make_batch(
        [Payload("ready", loaded.transforms(decode_rgb(d, POLICY))) for d in data]
    )
    device_inputs, _ = dev.make_batch([Payload(PayloadKind.JPEG, encoded_tensor(d)) for d in data])
    top_host = [t.indices[0] for t in cpu.predict(host_inputs, 1)]
    top_device = [t.indices[0] for t in dev.predict(device_inputs, 1)]
    assert top_host == top_device
