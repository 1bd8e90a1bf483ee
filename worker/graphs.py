"""The forward pass as one call: model, softmax and top-k in one step function, which a CUDA graph
captures once per padded batch size and which runs as it is (eagerly) everywhere else.

Eager, a ResNet-50 forward pass is a couple of hundred Python-level kernel launches, each of
which must win the GIL back from the I/O threads; a replayed graph is one call. The step's
output is packed, (N, 2k) float32 of the top-k probabilities then their class indices (exact in
float32 below 2**24 classes), so that a batch is read back as one copy into one pinned buffer.
The read-back waits on a blocking CUDA event: the thread sleeps instead of spinning a core.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Step = Callable[[torch.Tensor], torch.Tensor]
# Largest k the captured graphs compute; a batch asking for more runs eagerly.
GRAPH_TOP_K = 16
# Eager runs of each step before its capture, on a side stream as the CUDA graph docs ask:
# cuDNN autotuning and lazy initialisation must not happen inside a capture.
WARMUP_RUNS = 3


def make_step(
    module: Callable[[torch.Tensor], Any],
    dtype: torch.dtype,
    memory_format: torch.memory_format,
    k: int,
) -> Step:
    """Normalised inputs (N, 3, H, W) -> packed (N, 2k): forward, float softmax, top-k."""

    def step(x: torch.Tensor) -> torch.Tensor:
        out = module(x.to(dtype=dtype, memory_format=memory_format))
        top = getattr(out, "logits", out).float().softmax(dim=1).topk(k, dim=1)
        return torch.cat([top.values, top.indices.float()], dim=1)

    return step


def unpack(packed: torch.Tensor, k: int) -> list[tuple[list[float], list[int]]]:
    """The first k probabilities and class indices of each row of a packed step output (host)."""
    width = packed.shape[1] // 2
    values = packed[:, :k].tolist()
    indices = packed[:, width : width + k].long().tolist()
    return list(zip(values, indices, strict=True))


class CudaGraphs:
    """One captured graph of ``step`` per padded batch size, all sharing one memory pool.

    Built at warm-up, before other threads start. ``run`` is for one thread at a time, and its
    result is a view of a reused pinned buffer: read it before the next call.
    """

    def __init__(
        self,
        step: Step,
        sizes: tuple[int, ...],
        blank: Callable[[int], torch.Tensor],
        k: int = GRAPH_TOP_K,
    ) -> None:
        """``blank(size)`` makes a zero input batch of ``size``: the graph's static input."""
        self.k = k
        self.sizes = tuple(sorted(sizes))
        self._pool = torch.cuda.graph_pool_handle()
        self._done = torch.cuda.Event(blocking=True)
        self._inputs: dict[int, torch.Tensor] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._host: dict[int, torch.Tensor] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        for size in reversed(self.sizes):  # largest first: the smaller ones reuse its blocks
            self._capture(step, blank(size))

    def _capture(self, step: Step, x: torch.Tensor) -> None:
        size = x.shape[0]
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                step(x)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = step(x)
        self._inputs[size], self._outputs[size], self._graphs[size] = x, out, graph
        self._host[size] = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The packed (n, 2k) output for inputs x (n <= the largest size), on the host."""
        n = x.shape[0]
        size = next(s for s in self.sizes if s >= n)
        self._inputs[size][:n].copy_(x)  # rows past n keep old inputs: their outputs are unread
        self._graphs[size].replay()
        host = self._host[size]
        host.copy_(self._outputs[size], non_blocking=True)
        self._done.record()
        self._done.synchronize()  # a blocking event: the thread sleeps until the copy is done
        return host[:n]
