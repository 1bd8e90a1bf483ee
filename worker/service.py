"""One queue message, start to finish: claim its jobs, fetch and decode them on I/O threads,
hand them to the pipeline, and return once every job has its final record stored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import redis

from contract import deadletter, defaults
from contract.errors import (
    DecodeError,
    InternalError,
    MalformedMessage,
    ServiceError,
    as_service_error,
)
from contract.job import Job, JobError, validate_top_k
from contract.store import CLAIMED, CORRUPT, MISSING, POISONED, SUSPECT, Claim, JobStore
from worker.decode import (
    JPEG_MAGIC,
    DecodePolicy,
    decode_rgb,
    encoded_tensor,
    is_gpu_decodable,
    rgb_uint8,
)
from worker.fetch import Fetcher
from worker.inference import JPEG, PIXELS, READY, Classifier, Payload
from worker.metrics import Metrics
from worker.pipeline import Pipeline, WorkItem
from worker.resilience import retry_redis

log = logging.getLogger(__name__)


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
        store: JobStore,
        fetcher: Fetcher,
        classifier: Classifier,
        pipeline: Pipeline,
        metrics: Metrics,
        io_pool: ThreadPoolExecutor,
        decode_policy: DecodePolicy,
        max_attempts: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.model = model
        self.worker_id = worker_id
        self.store = store
        self.fetcher = fetcher
        self.classifier = classifier
        self.pipeline = pipeline
        self.metrics = metrics
        self.io_pool = io_pool
        self.decode_policy = decode_policy
        self.max_attempts = max_attempts
        self.clock = clock

    def handle(self, job_ids: object) -> Outcome:
        """Process one message's jobs. Returns only once every claimed job's record is final."""
        ids = self._checked_ids(job_ids)
        claims = self._claim(ids, fresh_only=True)
        items = [self._start(c.job) for c in claims if c.state == CLAIMED]
        suspects = [c.job_id for c in claims if c.state == SUSPECT]
        finished = [item.done.result() for item in items]
        finished += [job for job_id in suspects if (job := self._run_alone(job_id))]
        skipped = len(ids) - len(finished)
        done = sum(job.status == "done" for job in finished)
        return Outcome(done=done, failed=len(finished) - done, skipped=skipped)

    def fail_unfinished(self, job_ids: Sequence[str], cause: Exception) -> None:
        """Last resort for a message that keeps failing: no job of it may stay running."""
        error = JobError(InternalError.type, f"the worker could not process the job: {cause}")
        now = self.clock()
        jobs = [job for job in map(self._readable, job_ids) if job and not job.is_final]
        retry_redis(lambda: self.store.finish_many([j.failed(error, now) for j in jobs]))

    def _readable(self, job_id: str) -> Job | None:
        try:
            return retry_redis(lambda: self.store.get(job_id))
        except (DecodeError, redis.ResponseError):
            return None

    def _checked_ids(self, job_ids: object) -> list[str]:
        if isinstance(job_ids, list) and all(isinstance(i, str) for i in job_ids):
            return job_ids
        self._dead_letter({"args": job_ids, "reason": "expected a list of job ID strings"})
        raise MalformedMessage(f"message is not a list of job IDs: {str(job_ids)[:200]}")

    def _dead_letter(self, entry: dict[str, object]) -> None:
        entry = {**entry, "worker": self.worker_id, "at": self.clock()}
        retry_redis(lambda: deadletter.append(self.store.redis, entry, now=entry["at"]))

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

    def _dead_letter_unusable(self, claims: Sequence[Claim]) -> None:
        """One entry per message for its jobs without a usable record, however many."""
        unusable = [c for c in claims if c.state in (MISSING, CORRUPT)]
        if not unusable:
            return
        counts = {str(s): sum(c.state == s for c in unusable) for s in (MISSING, CORRUPT)}
        log.warning("%d jobs have no usable record (%s); skipped", len(unusable), counts)
        ids = [c.job_id for c in unusable[: defaults.DEAD_LETTER_MAX_IDS]]
        self._dead_letter({"reason": "records missing or corrupt", "job_ids": ids, **counts})

    def _start(self, job: Job) -> WorkItem:
        item = WorkItem(job)
        self.pipeline.expect(1)
        self.metrics.stage("queue_wait", max(0.0, (job.started or 0) - (job.submitted or 0)))
        self.io_pool.submit(self._prepare_and_submit, item)
        return item

    def _prepare_and_submit(self, item: WorkItem) -> None:
        self.prepare(item)
        self.pipeline.submit(item)

    def prepare(self, item: WorkItem) -> None:
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
            pixels = self.classifier.loaded.transforms(decode_rgb(data, policy))
            self.metrics.stage("decode", time.perf_counter() - started)
            return Payload(READY, pixels)
        if is_gpu_decodable(data, policy) and _has_end_marker(data):
            return Payload(JPEG, encoded_tensor(data))
        return Payload(PIXELS, rgb_uint8(data, policy))

    def _run_alone(self, job_id: str) -> Job | None:
        """A job that was in flight when a worker died: retried by itself, so a poison pill
        takes no neighbour down with it again, and counted, so it cannot loop forever."""
        claim = self._claim([job_id], fresh_only=False)[0]
        if claim.state == POISONED:
            return claim.job
        if claim.state != CLAIMED:
            return None
        item = WorkItem(claim.job, alone=True)
        self.pipeline.expect(1)
        self.prepare(item)
        return self.pipeline.submit(item).result()


def _has_end_marker(data: bytes) -> bool:
    """A JPEG cut short has no EOI marker; nvJPEG would pad it silently, so PIL must refuse it."""
    return data.startswith(JPEG_MAGIC) and data[-64:].rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
