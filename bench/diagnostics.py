"""What happened during a measurement, beyond its rate: CPU seconds per image of each process
involved, the mean batch size, and the worker's own per-stage seconds per image.

On a shared machine the rates move with other people's load; CPU seconds per image barely do,
so comparing them says what the queue itself costs. The stage seconds come from the worker's
Prometheus metrics: the in-process registry for the ceiling, ``/metrics`` for worker processes.
"""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

# Cumulative samples read from the worker's metrics (see worker/metrics.py).
_SUMS = ("imgcls_batch_size_sum", "imgcls_batch_size_count", "imgcls_stage_seconds_sum")
# The benchmark's own process, in CPU breakdowns.
BENCHMARK = "benchmark"


def metric_sums(text: str) -> dict[str, float]:
    """Batch-size and stage-seconds totals from a Prometheus text page."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in _SUMS:
                stage = sample.labels.get("stage")
                key = f"{sample.name}:{stage}" if stage else sample.name
                out[key] = out.get(key, 0.0) + sample.value
    return out


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of a process, all its threads (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Reading:
    cpu: dict[str, float]
    sums: dict[str, float]


@dataclass
class Probe:
    """Reads the CPU time of this process and of ``pids``, and the worker metrics."""

    pids: dict[str, int] = field(default_factory=dict)
    registry: CollectorRegistry | None = None
    metrics_ports: Sequence[int] = ()

    def read(self) -> Reading:
        cpu = {BENCHMARK: time.process_time()}
        cpu.update({name: process_cpu_s(pid) for name, pid in self.pids.items()})
        return Reading(cpu, self._sums())

    def _sums(self) -> dict[str, float]:
        pages = [generate_latest(self.registry).decode()] if self.registry else []
        for port in self.metrics_ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                pages.append(r.read().decode())
        total: dict[str, float] = {}
        for page in pages:
            for key, value in metric_sums(page).items():
                total[key] = total.get(key, 0.0) + value
        return total


def summarize(before: Reading, after: Reading, images: int) -> dict[str, Any]:
    cpu = {k: 1000 * (after.cpu[k] - before.cpu[k]) / images for k in after.cpu}
    sums = {k: v - before.sums.get(k, 0.0) for k, v in after.sums.items()}
    batches = sums.get("imgcls_batch_size_count", 0.0)
    prefix = "imgcls_stage_seconds_sum:"
    stages = {k.removeprefix(prefix): v for k, v in sums.items() if k.startswith(prefix)}
    return {
        "cpu_ms_per_image": cpu,
        "service_cpu_ms_per_image": sum(v for k, v in cpu.items() if k != BENCHMARK),
        "mean_batch": sums["imgcls_batch_size_sum"] / batches if batches else None,
        "stage_ms_per_image": {k: 1000 * v / images for k, v in stages.items()},
    }
