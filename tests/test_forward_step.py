"""The forward step (model, softmax, top-k, packed for one read-back) that CUDA graphs capture,
run eagerly here on the CPU device through ``Classifier.predict``."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms._presets import ImageClassification

from worker.graphs import GRAPH_TOP_K, make_step, unpack
from worker.inference import Classifier
from worker.models import LoadedModel

CLASSES = 40
CROP = 16


def _tiny_model() -> LoadedModel:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * CROP * CROP, CLASSES))
    return LoadedModel(
        name="tiny",
        module=module.eval(),
        transforms=ImageClassification(crop_size=CROP, resize_size=CROP + 2),
        categories=tuple(f"class{i}" for i in range(CLASSES)),
        weights_id="test",
        random_weights=True,
    )


@pytest.fixture
def classifier() -> Classifier:
    clf = Classifier(
        _tiny_model(),
        torch.device("cpu"),
        torch.float32,
        channels_last=False,
        compile=False,
        batch_size=8,
        cuda_graphs=True,
    )
    clf.warmup()
    return clf


def _expected(clf: Classifier, x: torch.Tensor, k: int) -> torch.return_types.topk:
    with torch.inference_mode():
        return clf.module(x).softmax(dim=1).topk(k, dim=1)


@pytest.mark.parametrize("k", [1, 5, GRAPH_TOP_K + 4, CLASSES + 10])
def test_predict_gives_the_models_top_k_on_the_cpu_without_graphs(
    classifier: Classifier, k: int
) -> None:
    assert not classifier.cuda_graphs  # requested, but graphs are for CUDA only
    x = torch.randn(3, 3, CROP, CROP)
    tops = classifier.predict(x, k)
    expected = _expected(classifier, x, min(k, CLASSES))
    assert [t.indices for t in tops] == expected.indices.tolist()
    assert torch.allclose(torch.tensor([t.probabilities for t in tops]), expected.values)


def test_a_batch_padded_to_a_tuned_size_answers_for_its_own_rows(classifier: Classifier) -> None:
    classifier.pad_sizes = (1, 2, 4, 8)
    x = torch.randn(3, 3, CROP, CROP)
    tops = classifier.predict(x, 5)
    assert len(tops) == 3
    assert [t.indices for t in tops] == _expected(classifier, x, 5).indices.tolist()


def test_the_packed_step_output_reads_back_indices_exactly() -> None:
    classes = 3000
    module = torch.nn.Identity()
    logits = torch.full((2, classes), -10.0)
    logits[0, 2999], logits[1, 1234], logits[1, 7] = 5.0, 6.0, 4.0
    packed = make_step(module, torch.float32, torch.contiguous_format, GRAPH_TOP_K)(logits)
    assert packed.shape == (2, 2 * GRAPH_TOP_K)
    (_, indices0), (values1, indices1) = unpack(packed, 2)
    assert indices0[0] == 2999
    assert indices1 == [1234, 7]
    assert values1[0] > values1[1] > 0
