"""Prometheus metrics of one worker: jobs by outcome, per-stage latency, batch sizes, device memory.

Each worker has its own registry (no module-level state), served by ``worker.health``.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from contract.job import Job

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# queue_wait: submitted to claimed; fetch: reading one source; decode: one image to model-ready
# pixels on the CPU (only where the device does not preprocess); device_preprocess: one batch
# made ready on the device (on a GPU: JPEG decode and resize there); inference: forward, softmax
# and top-k of one batch; store: one batch's final records written.
STAGES = ("queue_wait", "fetch", "decode", "device_preprocess", "inference", "store")


class Metrics:
    def __init__(self, model: str, registry: CollectorRegistry | None = None) -> None:
        self.model = model
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs = Counter(
            "imgcls_jobs_total",
            "Jobs that reached a final state.",
            ["model", "status", "error_type"],
            registry=r,
        )
        self.stages = Histogram(
            "imgcls_stage_seconds",
            "Seconds spent per stage.",
            ["model", "stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batches = Histogram(
            "imgcls_batch_size",
            "Jobs per forward pass.",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.device_memory = Gauge(
            "imgcls_device_memory_bytes",
            "Device memory allocated by the model's process.",
            ["model", "device"],
            registry=r,
        )
        self.ready = Gauge(
            "imgcls_worker_ready",
            "1 once the model is warm and jobs are taken.",
            ["model"],
            registry=r,
        )
        # Each stage's labelled histogram, looked up on its first observation only (a stage
        # never observed stays out of the exposition, as before).
        self._stage: dict[str, Histogram] = {}

    def stage(self, name: str, seconds: float) -> None:
        child = self._stage.get(name)
        if child is None:
            child = self._stage.setdefault(name, self.stages.labels(self.model, name))
        child.observe(seconds)

    def batch(self, size: int) -> None:
        self.batches.labels(self.model).observe(size)

    def finished(self, records: Iterable[Job]) -> None:
        """Count final records: one counter update per (status, error type) of the batch."""
        counts = collections.Counter(
            (job.status, job.error.type if job.error is not None else "") for job in records
        )
        for (status, error_type), n in counts.items():
            self.jobs.labels(self.model, status, error_type).inc(n)

    def watch_device(self, device: str) -> None:
        """Sample the device memory allocated at scrape time; a CPU worker has no sample."""
        if not device.startswith("cuda"):
            return
        import torch

        index = torch.device(device)
        gauge = self.device_memory.labels(self.model, device)
        gauge.set_function(lambda: torch.cuda.memory_allocated(index))
