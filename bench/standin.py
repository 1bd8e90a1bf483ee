"""A device stand-in: the worker on its GPU path with a device that does no work, to measure
the host's CPU per job on that path (issue 10); ``python -m bench.standin_worker`` runs it.

Everything the host does on a GPU worker runs as it is: claims, fetches, the header check
(``is_gpu_decodable``: no decode on the host), the JPEG bytes as a tensor, the pipeline, the
read-back of each batch's packed top-k (``graphs.unpack``), the records and their store. Only
the device's own work is replaced by a step that costs nothing: the batch of encoded bytes is
handed over in one call and comes back at once, and the forward pass is a fixed packed output,
as a replayed CUDA graph would leave it in its pinned buffer.
"""

from __future__ import annotations

from typing import Any

import torch

from worker.graphs import GRAPH_TOP_K, unpack
from worker.inference import Classifier, Payload, TopK


class StandInClassifier(Classifier):
    """A Classifier on the GPU path (``device_preprocess``) whose device does no work."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "device_preprocess": True})
        k = min(GRAPH_TOP_K, len(self.loaded.categories))
        self._packed = torch.zeros(self.batch_size, 2 * k)
        self._image = torch.zeros(3, self.crop, self.crop, dtype=torch.uint8)

    def _make_batch(self, payloads: list[Payload]) -> tuple[torch.Tensor, dict[int, Exception]]:
        images, errors = self._to_device_pixels(payloads)
        return torch.empty(len(images), 0), errors

    def _decode_jpegs(
        self, positions: list[int], payloads: list[Payload], errors: dict[int, Exception]
    ) -> dict[int, torch.Tensor]:
        """The batch's bytes go to the stand-in nvJPEG in one call, which returns at once."""
        _ = [payloads[i].data for i in positions]
        return dict.fromkeys(positions, self._image)

    def predict(self, x: torch.Tensor, k: int) -> list[TopK]:
        k = min(k, self._packed.shape[1] // 2)
        return [TopK(v, i) for v, i in unpack(self._packed[: x.shape[0]], k)]
