"""The Python API: submit jobs (one or a million), read them, and wait for them."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import redis
from celery import Celery

from contract import defaults, keys, registry
from contract.connection import connect
from contract.errors import JobFailed, ServiceError, Unavailable, UnsupportedModel
from contract.job import (
    QUEUED,
    ErrorInfo,
    Job,
    Prediction,
    new_job_id,
    validate_job_id,
    validate_model_name,
    validate_top_k,
    validate_uri,
)
from contract.messaging import TASK_NAME, make_celery
from contract.store import JobStore

# Jobs written to Redis per pipeline when submitting in bulk.
_WRITE_BATCH = 2000


@dataclass(frozen=True)
class SubmitRequest:
    uri: str
    job_id: str | None = None


class Client:
    """Talks to one Redis: job records through ``JobStore``, queue messages through Celery."""

    def __init__(
        self,
        connection: redis.Redis,
        celery: Celery,
        *,
        ttl_s: int = defaults.JOB_TTL_S,
        chunk_size: int = defaults.CHUNK_SIZE,
    ) -> None:
        self.redis = connection
        self.celery = celery
        self.store = JobStore(connection, ttl_s)
        self.chunk_size = chunk_size

    @classmethod
    def from_url(cls, redis_url: str = defaults.REDIS_URL, **kwargs: int) -> Client:
        return cls(connect(redis_url), make_celery(redis_url), **kwargs)

    def close(self) -> None:
        self.redis.close()
        self.celery.close()

    def submit(
        self,
        uri: str,
        *,
        model: str = defaults.MODEL,
        top_k: int = defaults.TOP_K,
        job_id: str | None = None,
    ) -> Job:
        return self.submit_many([SubmitRequest(uri, job_id)], model=model, top_k=top_k)[0]

    def submit_many(
        self,
        requests: Iterable[SubmitRequest | str],
        *,
        model: str = defaults.MODEL,
        top_k: int = defaults.TOP_K,
    ) -> list[Job]:
        """Enqueue every request; returns the records in input order.

        An ID that already exists is not queued again: its current record is returned instead.
        """
        return list(self.iter_submit(requests, model=model, top_k=top_k))

    def iter_submit(
        self,
        requests: Iterable[SubmitRequest | str],
        *,
        model: str = defaults.MODEL,
        top_k: int = defaults.TOP_K,
    ) -> Iterator[Job]:
        """Like ``submit_many`` but streams, so a backlog of millions never sits in memory."""
        self.check_model(model, top_k)
        it = iter(requests)
        while batch := list(itertools.islice(it, _WRITE_BATCH)):
            yield from self._submit_batch(batch, model, top_k)

    def check_model(self, model: str, top_k: int) -> None:
        """Refuse, before anything is queued, a model no worker serves or a top_k it cannot give."""
        validate_model_name(model)
        validate_top_k(top_k)
        info = registry.get_model(self.redis, model)
        if info is None:
            known = ", ".join(registry.known_models(self.redis)) or "none yet"
            raise UnsupportedModel(
                f"no worker has registered model {model!r} (registered: {known}); "
                f"start one with: python -m worker --model {model}"
            )
        validate_top_k(top_k, info.num_classes)

    def _submit_batch(self, batch: list[SubmitRequest | str], model: str, top_k: int) -> list[Job]:
        now = time.time()
        jobs = [_new_job(r, model, top_k, now) for r in batch]
        created = self.store.create_many(jobs)
        fresh = [j for j, c in zip(jobs, created, strict=True) if c]
        self._enqueue(fresh)
        if len(fresh) == len(jobs):
            return jobs
        old = [j.id for j, c in zip(jobs, created, strict=True) if not c]
        existing = {j.id: j for j in self.store.get_many(old) if j is not None}
        return [j if c else existing.get(j.id, j) for j, c in zip(jobs, created, strict=True)]

    def resend(self, job_ids: Sequence[str]) -> list[str]:
        """Send the jobs of ``job_ids`` that are still queued again; returns their IDs.

        For a message that never ran (dead-lettered): final or running jobs are left alone."""
        queued = [j for j in self.store.get_many(job_ids) if j is not None and j.status == QUEUED]
        for model in dict.fromkeys(j.model for j in queued):
            self._enqueue([j for j in queued if j.model == model])
        return [j.id for j in queued]

    def _enqueue(self, jobs: Sequence[Job]) -> None:
        if not jobs:
            return
        queue = keys.queue_name(jobs[0].model)
        sent = 0
        try:
            with self.celery.producer_or_acquire() as producer:
                for start in range(0, len(jobs), self.chunk_size):
                    ids = [j.id for j in jobs[start : start + self.chunk_size]]
                    self.celery.send_task(
                        TASK_NAME, args=[ids], queue=queue, routing_key=queue, producer=producer
                    )
                    sent = start + len(ids)
        except Exception as e:
            # Records without a message would stay queued forever: fail them visibly instead.
            error = ErrorInfo(Unavailable.type, f"could not enqueue the job: {e}")
            self.store.finish_many([j.failed(error, time.time()) for j in jobs[sent:]])
            raise Unavailable(f"could not enqueue {len(jobs) - sent} jobs: {e}") from e

    def get(self, job_id: str) -> Job | None:
        return self.store.get(job_id)

    def get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        return self.store.get_many(job_ids)

    def wait(self, job_id: str, timeout: float) -> Job | None:
        return self.wait_many([job_id], timeout)[0]

    def wait_many(self, job_ids: Sequence[str], timeout: float) -> list[Job | None]:
        """The records once each is final or ``timeout`` seconds have passed, in input order.

        Blocks on the workers' finished-jobs channel rather than polling; re-reads the records
        after each quiet second so that an announcement missed across a reconnect costs little.
        """
        latest: dict[str, Job | None] = {}
        pending = list(dict.fromkeys(job_ids))
        deadline = time.monotonic() + timeout
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(keys.finished_channel())
            pending = self._refresh(pending, latest)
            read_at = time.monotonic()
            while pending and (left := deadline - time.monotonic()) > 0:
                message = pubsub.get_message(timeout=min(defaults.WAIT_RECHECK_S, left))
                if message is None:
                    # Not only after a quiet second: the subscription's confirmation is None too.
                    if time.monotonic() - read_at >= defaults.WAIT_RECHECK_S:
                        pending, read_at = self._refresh(pending, latest), time.monotonic()
                    continue
                announced = set(json.loads(message["data"]))
                hits = [i for i in pending if i in announced]
                if hits:
                    self._refresh(hits, latest)
                    pending = [i for i in pending if not _final(latest.get(i))]
        finally:
            pubsub.close()
        return [latest.get(i) for i in job_ids]

    def _refresh(self, job_ids: list[str], latest: dict[str, Job | None]) -> list[str]:
        """Re-read ``job_ids`` into ``latest``; returns those not final yet (missing IDs are)."""
        still = []
        for start in range(0, len(job_ids), _WRITE_BATCH):
            chunk = job_ids[start : start + _WRITE_BATCH]
            for job_id, job in zip(chunk, self.store.get_many(chunk), strict=True):
                latest[job_id] = job
                if job is not None and not job.is_final:
                    still.append(job_id)
        return still

    def result(self, job_id: str, timeout: float) -> list[Prediction]:
        """A job's predictions, waiting up to ``timeout``; raises ``JobFailed`` if it failed."""
        job = self.wait(job_id, timeout)
        if job is None:
            raise ServiceError(f"no job {job_id!r} (never submitted, or its record expired)")
        if job.error is not None:
            raise JobFailed(job.id, job.error.type, job.error.message)
        if job.predictions is None:
            raise TimeoutError(f"job {job_id} is still {job.status} after {timeout} s")
        return list(job.predictions)


def _final(job: Job | None) -> bool:
    return job is None or job.is_final


def _new_job(request: SubmitRequest | str, model: str, top_k: int, now: float) -> Job:
    if isinstance(request, str):
        request = SubmitRequest(request)
    job_id = new_job_id() if request.job_id is None else validate_job_id(request.job_id)
    return Job(id=job_id, uri=validate_uri(request.uri), model=model, top_k=top_k, submitted=now)
