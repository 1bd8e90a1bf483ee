"""The GPU path's preprocessing (batched JPEG decode, one batched resize, normalise on the device),
run here on the CPU device: it must agree with the PIL path the seed's pipeline uses."""

from __future__ import annotations

import io

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.io import decode_jpeg
from torchvision.transforms._presets import ImageClassification

from tests.support import make_jpeg
from worker import resize
from worker.decode import DecodePolicy, decode_rgb, encoded_tensor, rgb_uint8
from worker.inference import Classifier, Payload, PayloadKind, crop_on_host
from worker.models import LoadedModel, ModelLoadError, load_model
from worker.nvdecode import NvImageCodec
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
    # The batched resize's tolerance (tests/test_resize.py), plus PIL's own decode and resize.
    diff = (x - reference).abs().flatten(1)
    assert diff.mean(dim=1).max() < 0.01
    assert diff.quantile(0.99, dim=1).max() < 0.05


def _count_calls(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    """Batch sizes of each call of ``module.name``, which still runs."""
    calls: list[int] = []
    real = getattr(module, name)

    def counting(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


@pytest.mark.parametrize(
    "sizes",
    [
        [(500, 375)] * 4,
        [(500, 375), (640, 480), (333, 500), (1000, 210), (200, 200), (260, 900)],
    ],
    ids=["one-shape", "all-different"],
)
def test_a_batch_is_resized_in_one_call_whatever_its_mix_of_sizes(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch, sizes: list[tuple[int, int]]
) -> None:
    calls = _count_calls(monkeypatch, resize, "roi_align")
    payloads = [
        Payload(PayloadKind.JPEG, encoded_tensor(make_jpeg(w, h, seed=i)))
        for i, (w, h) in enumerate(sizes)
    ]
    x, errors = _classifier(loaded, True).make_batch(payloads)
    assert errors == {}
    assert x.shape[0] == len(sizes)
    assert calls == [len(sizes)]


def test_a_corrupt_jpeg_fails_alone_in_a_batch_of_mixed_sizes(loaded: LoadedModel) -> None:
    bad = make_jpeg(640, 480, seed=2)[:2000]
    good = [make_jpeg(500, 375, seed=1), make_jpeg(300, 700, seed=3)]
    png = _png(make_jpeg(900, 260, seed=4))
    payloads = [
        Payload(PayloadKind.JPEG, encoded_tensor(good[0])),
        Payload(PayloadKind.JPEG, encoded_tensor(bad)),
        Payload(PayloadKind.PIXELS, rgb_uint8(png, POLICY)),
        Payload(PayloadKind.JPEG, encoded_tensor(good[1])),
    ]
    x, errors = _classifier(loaded, True).make_batch(payloads)
    assert list(errors) == [1]
    kept = [good[0], png, good[1]]
    reference = torch.stack([loaded.transforms(decode_rgb(d, POLICY)) for d in kept])
    assert x.shape == reference.shape
    assert (x - reference).abs().flatten(1).mean(dim=1).max() < 0.01


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


@pytest.mark.parametrize("sizes", [[(500, 375), (64, 48), (301, 300)], [(20, 1000)]], ids=str)
def test_the_cpu_path_normalising_per_batch_matches_the_transforms_to_the_bit(
    loaded: LoadedModel, sizes: list[tuple[int, int]]
) -> None:
    images = [decode_rgb(make_jpeg(w, h, seed=w), POLICY) for w, h in sizes]
    payloads = [Payload(PayloadKind.CROPPED, crop_on_host(i, loaded.transforms)) for i in images]
    payloads.insert(1, Payload(PayloadKind.READY, loaded.transforms(images[0])))
    x, errors = _classifier(loaded, False).make_batch(payloads)
    reference = torch.stack([loaded.transforms(i) for i in [images[0], *images]])
    assert not errors
    assert torch.equal(x, reference)


@pytest.mark.parametrize(
    ("resize", "crop", "size"),
    [(16, 16, (64, 48)), (16, 32, (64, 48)), (48, 40, (64, 48)), (256, 224, (1000, 20))],
    ids=["equal", "crop-larger-pads", "same-size", "thin"],
)
def test_the_host_crop_matches_torchvisions_resize_and_center_crop_to_the_bit(
    resize: int, crop: int, size: tuple[int, int]
) -> None:
    transforms = ImageClassification(crop_size=crop, resize_size=resize)
    image = decode_rgb(make_jpeg(*size, seed=resize), POLICY)
    resized = TF.resize(image, transforms.resize_size, transforms.interpolation, antialias=True)
    reference = TF.pil_to_tensor(TF.center_crop(resized, transforms.crop_size))
    assert torch.equal(crop_on_host(image, transforms).permute(2, 0, 1), reference)


def test_a_host_crop_holds_only_its_own_pixels() -> None:
    # A wide image resized to a short side of 16 is 160 pixels long; the job keeps its 16x16
    # crop until its whole message is stored, not the resized image.
    transforms = ImageClassification(crop_size=16, resize_size=16)
    out = crop_on_host(decode_rgb(make_jpeg(1000, 100, seed=1), POLICY), transforms)
    assert out.shape == (16, 16, 3) and out.is_contiguous()
    assert out.untyped_storage().nbytes() == 16 * 16 * 3


def test_nvimgcodec_refuses_a_device_without_cuda_at_setup() -> None:
    with pytest.raises(ModelLoadError, match="needs a CUDA device"):
        NvImageCodec(torch.device("cpu"))


class _RefusesOddPositions:
    """Stands in for nvImageCodec (no GPU here): refuses odd positions and what it cannot read,
    with None, as nvImageCodec does."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def decode(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        self.calls.append(len(data))
        return [None if i % 2 else _decoded_or_none(d) for i, d in enumerate(data)]


def _decoded_or_none(data: torch.Tensor) -> torch.Tensor | None:
    try:
        return decode_jpeg(data)
    except RuntimeError:
        return None


def test_images_the_gpu_decoder_refuses_are_decoded_one_by_one(loaded: LoadedModel) -> None:
    jpegs = [make_jpeg(500, 375, seed=s) for s in range(4)]
    broken = jpegs[0][:200]  # a JPEG cut short: neither decoder can read it
    payloads = [Payload(PayloadKind.JPEG, encoded_tensor(j)) for j in [*jpegs, broken]]
    reference, _ = _classifier(loaded, True).make_batch(payloads[:4])
    clf = _classifier(loaded, True)
    clf._nvdecode = stand_in = _RefusesOddPositions()  # type: ignore[assignment]
    x, errors = clf.make_batch(payloads)
    assert stand_in.calls == [5]  # one batched call for the whole batch
    assert set(errors) == {4}  # only the broken image fails, by its position
    assert torch.equal(x, reference)
