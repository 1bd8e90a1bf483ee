"""(d) Latency at low load: one job at a time, each submitted and waited for as a caller would.

The overhead is the latency less what the same image costs in-process with a batch of one
(fetch, decode, preprocess, forward): queueing, the batcher's wait, Redis and Celery.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from bench.e2e import delete_jobs
from contract.job import DONE
from producer.client import Client

# Samples run first and dropped: a worker's first batch of one meets new shapes.
WARMUP_SAMPLES = 3
# Seconds one job may take before the sample fails the run.
JOB_TIMEOUT_S = 60


@dataclass(frozen=True)
class Latency:
    samples: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    # submitted -> finished stamps on the job record: the service's side, without the client's
    # pub/sub subscription and record read.
    server_p50_ms: float
    batch1_ms: float

    @property
    def overhead_p50_ms(self) -> float:
        return self.p50_ms - self.batch1_ms

    @property
    def overhead_p99_ms(self) -> float:
        return self.p99_ms - self.batch1_ms


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks, as numpy's default."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def one(client: Client, model: str, uri: str, top_k: int) -> tuple[float, float]:
    """Client-observed and record-stamped seconds for one job."""
    started = time.perf_counter()
    job = client.submit(uri, model=model, top_k=top_k)
    record = client.wait(job.id, timeout=JOB_TIMEOUT_S)
    elapsed = time.perf_counter() - started
    delete_jobs(client.redis, [job.id])
    if record is None or record.status != DONE or record.finished is None:
        status = None if record is None else record.status
        raise RuntimeError(f"latency job {job.id} ended {status}: {record}")
    return elapsed, record.finished - (record.submitted or record.finished)


def measure_latency(
    client: Client,
    model: str,
    uris: Sequence[str],
    n: int,
    seconds: float,
    top_k: int,
    batch1_ms: float,
) -> Latency:
    for i in range(WARMUP_SAMPLES):
        one(client, model, uris[i % len(uris)], top_k)
    seen: list[tuple[float, float]] = []
    started = time.perf_counter()
    while len(seen) < n and (len(seen) < 2 or time.perf_counter() - started < seconds):
        seen.append(one(client, model, uris[len(seen) % len(uris)], top_k))
    client_ms = [c * 1000 for c, _ in seen]
    return Latency(
        samples=len(seen),
        p50_ms=percentile(client_ms, 50),
        p99_ms=percentile(client_ms, 99),
        mean_ms=sum(client_ms) / len(client_ms),
        server_p50_ms=percentile([s * 1000 for _, s in seen], 50),
        batch1_ms=batch1_ms,
    )
