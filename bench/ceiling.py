"""(b) The in-process ceiling: the worker's own runtime with the queue taken away.

``worker.app.setup`` builds the runtime exactly as a worker process does (model, warm-up,
``Classifier``, ``Pipeline``, I/O thread pool, decode policy); only its job store is swapped
for one in memory. Then ``concurrency`` threads each hand ``Service.handle`` one message's worth
of job IDs at a time, as Celery's thread pool does. What remains is everything the worker does
per item and per batch (fetch, decode, preprocess, micro-batching, forward, top-k, records)
with no Redis round trip and no Celery: the most the worker could do on this machine.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, cast

import torch

from bench.diagnostics import Probe, summarize
from contract import defaults
from contract.job import QUEUED, RUNNING, Job
from contract.shards import ShardedStore
from contract.store import CLAIMED, Claim
from worker.app import Runtime, setup
from worker.inference import Classifier
from worker.pipeline import WorkItem
from worker.settings import CLOSE_TIMEOUT_S, Settings


@dataclass(frozen=True)
class Throughput:
    images: int
    seconds: float
    failed: int = 0
    # CPU per image, batch sizes and stage times (see bench/diagnostics.py).
    diagnostics: dict[str, Any] | None = None

    @property
    def img_s(self) -> float:
        return self.images / self.seconds


class MemoryStore:
    """Stands in for ``JobStore``: claims and finishes cost nothing, so no queue is measured."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.finished: list[Job] = []
        self._lock = threading.Lock()
        self.redis = None  # only the dead-letter path uses it, and no message here is malformed

    def add(self, jobs: Sequence[Job]) -> None:
        self.jobs.update((j.id, j) for j in jobs)

    def claim_many(
        self, job_ids: Sequence[str], model: str, now: float, worker: str, **_: object
    ) -> list[Claim]:
        return [
            Claim(i, CLAIMED, replace(self.jobs[i], status=RUNNING, started=now, attempts=1))
            for i in job_ids
        ]

    def finish_many(self, jobs: Sequence[Job]) -> list[bool]:
        with self._lock:
            self.finished.extend(jobs)
        return [True] * len(jobs)

    def drain(self) -> list[Job]:
        with self._lock:
            out, self.finished = self.finished, []
        return out


class InProcess:
    """The worker's runtime in this process, detached from Redis. Use as a context manager."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runtime: Runtime = setup(settings)
        self.store = MemoryStore()
        # A stand-in with the methods the service and the pipeline call on their store.
        self.runtime.service.store = cast(ShardedStore, self.store)
        self.runtime.pipeline.store = cast(ShardedStore, self.store)
        self._serial = 0

    def __enter__(self) -> InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the pipeline and free the model (not ``Runtime.close``: that talks to Redis)."""
        self.runtime.io_pool.shutdown(wait=True)  # the feeder first, then what it feeds
        self.runtime.pipeline.close(CLOSE_TIMEOUT_S)
        del self.runtime
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def classifier(self) -> Classifier:
        return self.runtime.service.classifier

    def jobs(self, uris: Sequence[str], n: int, top_k: int) -> list[Job]:
        """``n`` queued job records cycling over ``uris``."""
        now = time.time()
        start, self._serial = self._serial, self._serial + n
        return [
            Job(
                id=f"inproc-{start + i}",
                uri=uris[i % len(uris)],
                model=self.settings.model,
                top_k=top_k,
                status=QUEUED,
                submitted=now,
            )
            for i in range(n)
        ]

    def ceiling(self, uris: Sequence[str], n: int, top_k: int) -> Throughput:
        """``n`` jobs through ``Service.handle`` from ``concurrency`` threads, no queue."""
        jobs = self.jobs(uris, n, top_k)
        self.store.add(jobs)
        self.store.drain()
        ids = [j.id for j in jobs]
        chunks = [ids[i : i + defaults.CHUNK_SIZE] for i in range(0, n, defaults.CHUNK_SIZE)]
        probe = Probe(registry=self.runtime.metrics.registry)
        before, started = probe.read(), time.time()
        with ThreadPoolExecutor(self.settings.concurrency, thread_name_prefix="message") as pool:
            outcomes = list(pool.map(self.runtime.service.handle, chunks))
        after, records = probe.read(), self.store.drain()
        finished = max(r.finished for r in records if r.finished is not None)
        failed = sum(o.failed + o.skipped for o in outcomes)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand cached blocks back: the workers share this GPU
        return Throughput(n, finished - started, failed, summarize(before, after, n))

    def forward_only(self, seconds: float, top_k: int) -> Throughput:
        """Full batches of ready input tensors through ``Classifier.predict``: the model's limit."""
        clf = self.classifier
        x = torch.randn(clf.batch_size, 3, clf.crop, clf.crop, device=clf.device)
        x = x.to(dtype=clf.dtype, memory_format=clf.memory_format)
        clf.predict(x, top_k)
        started, batches = time.perf_counter(), 0
        while batches < 2 or time.perf_counter() - started < seconds:
            clf.predict(x, top_k)  # ends in .cpu(): the device has finished the batch
            batches += 1
        return Throughput(batches * clf.batch_size, time.perf_counter() - started)

    def one_image_s(self, uri: str, top_k: int) -> float:
        """Seconds for one image alone: fetch, decode, preprocess, forward, top-k.

        What a job costs with no queue and no batching wait; latency minus this is overhead.
        """
        return self._one(self.jobs([uri], 1, top_k)[0])

    def _one(self, job: Job) -> float:
        service, clf = self.runtime.service, self.classifier
        item = WorkItem(job)
        started = time.perf_counter()
        service.load_image(item)  # the worker's own per-item path: fetch, decode, preprocess
        if item.payload is None:
            raise RuntimeError(f"in-process load_image failed for {job.uri}: {item.error}")
        inputs, errors = clf.make_batch([item.payload])
        if errors:
            raise RuntimeError(f"in-process make_batch failed for {job.uri}: {errors}")
        clf.predict(inputs, job.top_k)
        return time.perf_counter() - started
