"""(c) End to end: jobs through the producer client, Redis, Celery and real worker processes.

The clock starts before the first job is submitted and stops at the latest ``finished`` stamp
of the job records, so submission, queueing, fetch, decode, inference and the result write
are all inside it. Every job must end ``done``; the counts are reported, never assumed.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from bench.diagnostics import Probe, summarize
from contract import keys
from contract.job import DONE, Job
from producer.client import Client

# Jobs per submit_many call: how a producer with a large backlog submits.
SUBMIT_CHUNK = 5000
# Seconds allowed per job on top of a fixed minute before waiting gives up (a stalled worker).
WAIT_PER_JOB_S = 0.05


@dataclass(frozen=True)
class E2EResult:
    workers: int
    jobs: int
    seconds: float
    submit_seconds: float
    done: int
    failed: int
    missing: int
    # CPU per image of each process, batch sizes and stage times (see bench/diagnostics.py).
    diagnostics: dict[str, Any] | None = None

    @property
    def img_s(self) -> float:
        return self.done / self.seconds

    @property
    def all_done(self) -> bool:
        return self.done == self.jobs


def submit(client: Client, model: str, uris: Sequence[str], n: int, top_k: int) -> list[str]:
    """Submit ``n`` jobs cycling over ``uris`` in chunks; returns their IDs."""
    ids: list[str] = []
    for start in range(0, n, SUBMIT_CHUNK):
        chunk = [uris[i % len(uris)] for i in range(start, min(n, start + SUBMIT_CHUNK))]
        ids += [job.id for job in client.submit_many(chunk, model=model, top_k=top_k)]
    return ids


def run_e2e(
    client: Client,
    model: str,
    uris: Sequence[str],
    n: int,
    top_k: int,
    workers: int,
    probe: Probe | None = None,
) -> E2EResult:
    before = probe.read() if probe else None
    started = time.time()
    ids = submit(client, model, uris, n, top_k)
    submitted = time.time()
    records = client.wait_many(ids, timeout=60 + WAIT_PER_JOB_S * n)
    after = probe.read() if probe else None
    delete_jobs(client.redis, ids)
    counts = Counter(r.status if r is not None else "missing" for r in records)
    ends = [r.finished for r in records if r is not None and r.finished is not None]
    finished = max(ends, default=time.time())
    return E2EResult(
        workers=workers,
        jobs=n,
        seconds=finished - started,
        submit_seconds=submitted - started,
        done=counts[DONE],
        failed=n - counts[DONE] - counts["missing"],
        missing=counts["missing"],
        diagnostics=summarize(before, after, n) if before and after else None,
    )


def warm_up(
    client: Client, model: str, uris: Sequence[str], n: int, top_k: int, workers: int
) -> E2EResult:
    """Jobs before the measured run: allocator pools, cuDNN autotuning for the batch shapes.

    Its rate, ramp included, is a low estimate of the real one, used to size the real run.
    """
    return run_e2e(client, model, uris, n, top_k, workers)


def _ended(job: Job | None) -> bool:
    return job is not None and job.finished is not None


def delete_jobs(client: redis.Redis, ids: Sequence[str], chunk: int = 5000) -> None:
    """Keep the private Redis small between runs: records would otherwise live for a day."""
    for start in range(0, len(ids), chunk):
        client.unlink(*(keys.job_key(i) for i in ids[start : start + chunk]))
