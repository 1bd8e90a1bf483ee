"""(d) Latency at low load: one job at a time, each submitted and waited for as a caller would.

The overhead is the latency less what the same image costs in-process with a batch of one
(fetch, decode, preprocess, forward): queueing, the batcher's wait, Redis and Celery. Each job
is paired with an in-process run of its image right after it, and the overhead percentiles are
of the pairs' differences, so background load on a shared machine hits both sides alike.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
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
    # Median in-process time of the same images, alone (batch of one).
    batch1_ms: float
    overhead_p50_ms: float
    overhead_p99_ms: float


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
    in_process: Callable[[str], float],
) -> Latency:
    """``in_process(uri)`` times one image alone in this process, for the overhead."""
    for i in range(WARMUP_SAMPLES):
        one(client, model, uris[i % len(uris)], top_k)
        in_process(uris[i % len(uris)])
    client_ms: list[float] = []
    server_ms: list[float] = []
    alone_ms: list[float] = []
    started = time.perf_counter()
    while len(client_ms) < n and (len(client_ms) < 2 or time.perf_counter() - started < seconds):
        uri = uris[len(client_ms) % len(uris)]
        seen, stamped = one(client, model, uri, top_k)
        client_ms.append(seen * 1000)
        server_ms.append(stamped * 1000)
        alone_ms.append(in_process(uri) * 1000)
    overhead = [c - a for c, a in zip(client_ms, alone_ms, strict=True)]
    return Latency(
        samples=len(client_ms),
        p50_ms=percentile(client_ms, 50),
        p99_ms=percentile(client_ms, 99),
        mean_ms=sum(client_ms) / len(client_ms),
        server_p50_ms=percentile(server_ms, 50),
        batch1_ms=percentile(alone_ms, 50),
        overhead_p50_ms=percentile(overhead, 50),
        overhead_p99_ms=percentile(overhead, 99),
    )
