"""One queue message, start to finish: claim its jobs, fetch and decode them on I/O threads,
hand them to the pipeline, and return once every job has its final record stored.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import redis

from contract import defaults, keys
from contract.errors import (
    InternalError,
    MalformedMessage,
    MalformedRecord,
    ServiceError,
    as_service_error,
)
from contract.job import ErrorInfo, Job, validate_top_k
from contract.shards import ShardedStore
from contract.store import CLAIMED, CORRUPT, EXPIRED_CLAIM, MISSING, POISONED, SUSPECT, Claim
from worker.deadletter import DeadLetters, is_job_ids
from worker.decode import (
    DecodePolicy,
    decode_rgb,
    encoded_tensor,
    has_end_marker,
    is_gpu_decodable,
    rgb_uint8,
)
from worker.fetch import Fetcher, is_local
from worker.inference import Classifier, Payload, PayloadKind, crop_on_host
from worker.metrics import Metrics
from worker.pipeline import Completion, Pipeline, WorkItem
from worker.resilience import retry_redis
from worker.settings import HOST_HANDOVER, HOST_HANDOVER_WAIT_MS

log = logging.getLogger(__name__)

HANDOVER_WAIT_S = HOST_HANDOVER_WAIT_MS / 1000


@dataclass(frozen=True)
class Outcome:
    """What handling one message did, for logs and tests."""

    done: int = 0
    failed: int = 0
    skipped: int = 0


class Service:
    def __init__(
        self,
        *,
        model: str,
        worker_id: str,
        store: ShardedStore,
        fetcher: Fetcher,
        classifier: Classifier,
        pipeline: Pipeline,
        metrics: Metrics,
        dead_letters: DeadLetters,
        io_pool: ThreadPoolExecutor,
        io_threads: int,
        host_pool: ThreadPoolExecutor,
        host_threads: int,
        decode_policy: DecodePolicy,
        max_attempts: int,
        clock: Callable[[], float] = time.time,
        version: str = "",
    ) -> None:
        self.model = model
        self.version = version
        self.worker_id = worker_id
        self.store = store
        self.fetcher = fetcher
        self.classifier = classifier
        self.pipeline = pipeline
        self.metrics = metrics
        self.dead_letters = dead_letters
        self.io_pool = io_pool
        self.io_threads = io_threads
        # Threads that load local files.
        self.host_pool = host_pool
        self.host_threads = host_threads
        self.decode_policy = decode_policy
        self.max_attempts = max_attempts
        self.clock = clock

    def handle(self, job_ids: object) -> Outcome:
        """Process one message's jobs. Returns only once every claimed job's record is final."""
        ids = self._checked_ids(job_ids)
        claims = self._claim(ids, fresh_only=True)
        items = self._start(_claimed_jobs(claims))
        suspects = [c.job_id for c in claims if c.state == SUSPECT]
        finished = [item.result() for item in items]
        finished += [job for job_id in suspects if (job := self._run_alone(job_id))]
        skipped = len(ids) - len(finished)
        done = sum(job.status == "done" for job in finished)
        return Outcome(done=done, failed=len(finished) - done, skipped=skipped)

    def fail_unfinished(self, job_ids: Sequence[str], cause: Exception) -> None:
        """Last resort for a message that keeps failing: no job of it may stay running."""
        error = ErrorInfo(InternalError.type, f"the worker could not process the job: {cause}")
        now = self.clock()
        jobs = [job for job in map(self._readable, job_ids) if job and not job.is_final]
        retry_redis(lambda: self.store.finish_many([j.failed(error, now) for j in jobs]))

    def _readable(self, job_id: str) -> Job | None:
        try:
            return retry_redis(lambda: self.store.get(job_id))
        except (MalformedRecord, redis.ResponseError):
            return None

    def _checked_ids(self, job_ids: object) -> list[str]:
        """The queue guard already refused a malformed message; this catches other callers."""
        if is_job_ids(job_ids):
            return job_ids
        message = json.dumps(job_ids, default=str)
        self._dead_letter("arguments are not one list of job ID strings", message)
        raise MalformedMessage(f"message is not a list of job IDs: {message[:200]}")

    def _dead_letter(self, reason: str, message: str, **extra: object) -> None:
        queue = keys.queue_name(self.model, self.version)
        self.dead_letters.record(reason, queue=queue, message=message, **extra)

    def _claim(self, ids: Sequence[str], *, fresh_only: bool) -> list[Claim]:
        claims = retry_redis(
            lambda: self.store.claim_many(
                ids,
                self.model,
                self.clock(),
                self.worker_id,
                fresh_only=fresh_only,
                max_attempts=self.max_attempts,
            )
        )
        for claim in claims:
            self._note_unclaimed(claim)
        self._dead_letter_unusable(claims)
        return claims

    def _note_unclaimed(self, claim: Claim) -> None:
        if claim.state == POISONED and claim.job is not None:
            log.error(
                "job %s failed as a poison pill after %d attempts", claim.job_id, claim.job.attempts
            )
            self.metrics.finished([claim.job])
        elif claim.state == EXPIRED_CLAIM and claim.job is not None:
            log.info("job %s expired: its deadline passed before it started", claim.job_id)
            self.metrics.finished([claim.job])

    def _dead_letter_unusable(self, claims: Sequence[Claim]) -> None:
        """One entry per message for its jobs without a usable record, however many."""
        unusable = [c for c in claims if c.state in (MISSING, CORRUPT)]
        if not unusable:
            return
        counts = {str(s): sum(c.state == s for c in unusable) for s in (MISSING, CORRUPT)}
        log.warning("%d jobs have no usable record (%s); skipped", len(unusable), counts)
        ids = [c.job_id for c in unusable[: defaults.DEAD_LETTER_MAX_IDS]]
        message = json.dumps([c.job_id for c in claims])
        self._dead_letter("records missing or corrupt", message, job_ids=ids, **counts)

    def _start(self, jobs: list[Job]) -> list[WorkItem]:
        """Load the jobs and hand them to the pipeline; returns at once.

        Local files go to the host threads (by default one per core the process has): there the
        whole load is CPU work, and many threads taking turns at one GIL cost more CPU than the
        work itself (README "Per-job cost"). Everything else goes to the I/O threads, each taking
        the next job as it comes free: a slow source (up to the fetch deadline) holds up only
        the thread it is on. One task per thread, not per job: each task costs a future, a
        lock and a thread woken, more than a local file's fetch."""
        if not jobs:
            return []
        group = Completion(len(jobs))
        items = [WorkItem(job, group) for job in jobs]
        self.pipeline.expect(len(items))
        for job in jobs:
            self.metrics.stage("queue_wait", max(0.0, (job.started or 0) - (job.submitted or 0)))
        local = [is_local(i.job.uri) for i in items]
        on_host = [i for i, here in zip(items, local, strict=True) if here]
        elsewhere = [i for i, here in zip(items, local, strict=True) if not here]
        self._spread(self.host_pool, self.host_threads, on_host, HOST_HANDOVER)
        self._spread(self.io_pool, self.io_threads, elsewhere, 1)
        return items

    def _spread(
        self, pool: ThreadPoolExecutor, threads: int, items: list[WorkItem], handover: int
    ) -> None:
        """One task per thread of ``pool`` (at most one per item), all taking from one queue."""
        waiting = deque(items)
        for _ in range(min(len(items), threads)):
            pool.submit(self._load_each, waiting, handover)

    def _load_each(self, waiting: deque[WorkItem], handover: int) -> None:
        """Load jobs one at a time until none is waiting (deque pops are atomic), handing them
        to the pipeline ``handover`` at a time, or with the first load that ends once the first
        of them has waited ``HOST_HANDOVER_WAIT_MS`` (each hand-over wakes its assemble thread;
        1 where the next load may wait on the network, so no loaded job waits behind it)."""
        loaded: list[WorkItem] = []
        first_at = 0.0
        while True:
            try:
                item = waiting.popleft()
            except IndexError:
                break
            self.load_image(item)
            now = time.monotonic()
            if not loaded:
                first_at = now
            loaded.append(item)
            if len(loaded) >= handover or not waiting or now - first_at >= HANDOVER_WAIT_S:
                self.pipeline.submit_many(loaded)
                loaded = []
        if loaded:  # another thread took the last job while this one loaded
            self.pipeline.submit_many(loaded)

    def load_image(self, item: WorkItem) -> None:
        """Fetch and decode one job's image into ``item``: a payload, or the error that ends it."""
        try:
            validate_top_k(item.job.top_k, len(self.classifier.loaded.categories))
            started = time.perf_counter()
            data = self.fetcher.fetch(item.job.uri)
            self.metrics.stage("fetch", time.perf_counter() - started)
            item.payload = self._payload(data)
        except ServiceError as e:
            item.error = e
        except Exception as e:
            log.exception("job %s failed while fetching or decoding", item.job.id)
            item.error = as_service_error(e)

    def _payload(self, data: bytes) -> Payload:
        policy = self.decode_policy
        if not self.classifier.device_preprocess:
            started = time.perf_counter()
            pixels = crop_on_host(decode_rgb(data, policy), self.classifier.loaded.transforms)
            self.metrics.stage("decode", time.perf_counter() - started)
            return Payload(PayloadKind.CROPPED, pixels)
        # A JPEG cut short has no EOI marker: nvJPEG would pad it silently, so PIL must refuse it.
        if is_gpu_decodable(data, policy) and has_end_marker(data):
            return Payload(PayloadKind.JPEG, encoded_tensor(data))
        return Payload(PayloadKind.PIXELS, rgb_uint8(data, policy))

    def _run_alone(self, job_id: str) -> Job | None:
        """A job that was in flight when a worker died: retried by itself, so a poison pill
        takes no neighbour down with it again, and counted, so it cannot loop forever."""
        claim = self._claim([job_id], fresh_only=False)[0]
        if claim.state == POISONED:
            return claim.job
        jobs = _claimed_jobs([claim])
        if not jobs:
            return None
        item = WorkItem(jobs[0], alone=True)
        self.pipeline.expect(1)
        self.load_image(item)
        return self.pipeline.submit(item).result()


def _claimed_jobs(claims: Sequence[Claim]) -> list[Job]:
    """The jobs this worker now runs: a claimed job always has its record."""
    return [c.job for c in claims if c.state == CLAIMED and c.job is not None]
