"""The Python API: submit jobs (one or a million), read them, and wait for them."""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import redis
from celery import Celery

from contract import defaults, keys, registry
from contract.batch import KEPT_OPEN, Batch, BatchSpec, new_batch_id, new_hold
from contract.connection import connect
from contract.errors import (
    AlreadyFinal,
    IdConflict,
    InvalidRequest,
    JobFailed,
    MalformedRecord,
    NotFound,
    ServiceError,
    Unavailable,
    UnsupportedModel,
)
from contract.job import (
    CANCELLED,
    EXPIRED,
    QUEUED,
    URI_SCHEME,
    ErrorInfo,
    Job,
    Prediction,
    Priority,
    new_job_id,
    parse_model_ref,
    timestamp,
    validate_batch_id,
    validate_callback_url,
    validate_deadline,
    validate_job_id,
    validate_output,
    validate_priority,
    validate_top_k,
    validate_ttl_s,
    validate_uri,
)
from contract.messaging import TASK_NAME, make_celery
from contract.registry import ModelInfo
from contract.shards import ShardedStore, connect_all, shard_of
from contract.store import UNSETTLED, CancelOutcome
from producer.finished import Announcements

log = logging.getLogger(__name__)

# Jobs written to Redis per pipeline when submitting in bulk.
_WRITE_BATCH = 2000


@dataclass(frozen=True)
class SubmitRequest:
    uri: str
    job_id: str | None = None
    callback_url: str | None = None  # where its final record is POSTed; overrides submit_many's


class Client:
    """Queue messages through Celery on the broker Redis (``connection``), job records through
    a ``ShardedStore`` over ``store_clients`` (default: the broker alone).

    A bare local path (no scheme) is made absolute against this process's working directory
    before it is queued, as the worker's directory means nothing to the caller; the gateway,
    whose directory means nothing to its callers either, passes ``absolute_paths=False``.
    ``ttl_s`` is how long a job's record is kept once final, unless a submission sets its own.
    """

    def __init__(
        self,
        connection: redis.Redis,
        celery: Celery,
        *,
        store_clients: Sequence[redis.Redis] = (),
        ttl_s: int = defaults.JOB_TTL_S,
        chunk_size: int = defaults.CHUNK_SIZE,
        absolute_paths: bool = True,
    ) -> None:
        self.redis = connection
        self.celery = celery
        self.store = ShardedStore(store_clients or [connection])
        self.ttl_s = validate_ttl_s(ttl_s)
        if chunk_size < 1:
            raise ValueError(f"a queue message carries at least one job, not {chunk_size}")
        self.chunk_size = chunk_size
        self.absolute_paths = absolute_paths

    @classmethod
    def from_url(
        cls, redis_url: str = defaults.REDIS_URL, store_urls: Sequence[str] = (), **kwargs: Any
    ) -> Client:
        """A client whose records live on ``store_urls`` (default: ``redis_url`` alone)."""
        broker = connect(redis_url)
        shards = connect_all(store_urls or [redis_url], redis_url, broker)
        return cls(broker, make_celery(redis_url), store_clients=shards, **kwargs)

    def close(self) -> None:
        self.store.close(keep=self.redis)
        self.redis.close()
        self.celery.close()

    def submit(
        self,
        uri: str,
        *,
        model: str = defaults.MODEL,
        top_k: int = defaults.TOP_K,
        job_id: str | None = None,
        callback_url: str | None = None,
        priority: str = Priority.NORMAL,
        batch: str | None = None,
        output: str | None = None,
        deadline: float | None = None,
        ttl_s: int | None = None,
    ) -> Job:
        """Enqueue one job; with ``callback_url``, its final record is also POSTed there. With
        ``batch`` it joins that batch; with ``output`` its record is also written there."""
        request = SubmitRequest(uri, job_id, callback_url)
        jobs = self.submit_many(
            [request],
            model=model,
            top_k=top_k,
            priority=priority,
            batch=batch,
            output=output,
            deadline=deadline,
            ttl_s=ttl_s,
        )
        return jobs[0]

    def submit_many(
        self,
        requests: Iterable[SubmitRequest | str],
        *,
        model: str = defaults.MODEL,
        top_k: int = defaults.TOP_K,
        callback_url: str | None = None,
        priority: str = Priority.NORMAL,
        batch: str | None = None,
        output: str | None = None,
        deadline: float | None = None,
        ttl_s: int | None = None,
        keep_open: bool = False,
    ) -> list[Job]:
        """Enqueue every request; returns the records in input order.

        The jobs form one batch (``Client.batch``): ``batch`` names it (an existing batch gains
        the jobs), else one is generated when there is more than one request or an ``output``
        (``s3://bucket/prefix/`` or a directory where the results sink writes the records).
        Each record carries its ``batch``.

        ``model`` is a name (its default version serves the jobs) or ``name@version``.
        An ID that already exists is not queued again: its current record is returned instead
        when the request is the same (uri, model, top_k); else ``IdConflict`` is raised.
        ``callback_url`` is the webhook of every request that names none of its own.
        ``deadline`` (Unix seconds): a job not started by then ends ``expired``, never run.
        ``ttl_s``: seconds each record is kept once final (default: the client's ``ttl_s``).

        The batch finishes when all its jobs are final, never while this call is still writing
        them (it holds the batch open meanwhile). ``keep_open``: more submissions follow, so it
        stays open after this call too, until ``close_batch``.
        """
        jobs = self.iter_submit(
            requests,
            model=model,
            top_k=top_k,
            callback_url=callback_url,
            priority=priority,
            batch=batch,
            output=output,
            deadline=deadline,
            ttl_s=ttl_s,
            keep_open=keep_open,
        )
        return list(jobs)

    def iter_submit(
        self,
        requests: Iterable[SubmitRequest | str],
        *,
        model: str = defaults.MODEL,
        top_k: int = defaults.TOP_K,
        callback_url: str | None = None,
        priority: str = Priority.NORMAL,
        batch: str | None = None,
        output: str | None = None,
        deadline: float | None = None,
        ttl_s: int | None = None,
        keep_open: bool = False,
    ) -> Iterator[Job]:
        """Like ``submit_many`` but streams, so a backlog of millions never sits in memory."""
        batches = self.iter_submit_batches(
            requests,
            model=model,
            top_k=top_k,
            callback_url=callback_url,
            priority=priority,
            batch=batch,
            output=output,
            deadline=deadline,
            ttl_s=ttl_s,
            keep_open=keep_open,
        )
        try:
            for jobs in batches:
                yield from jobs
        finally:
            batches.close()  # now, not when collected: it releases the batch's hold

    def iter_submit_batches(
        self,
        requests: Iterable[SubmitRequest | str],
        *,
        model: str = defaults.MODEL,
        top_k: int = defaults.TOP_K,
        callback_url: str | None = None,
        priority: str = Priority.NORMAL,
        batch: str | None = None,
        output: str | None = None,
        deadline: float | None = None,
        ttl_s: int | None = None,
        keep_open: bool = False,
    ) -> Generator[list[Job], None, None]:
        """Like ``iter_submit``, one list per write batch: each list is queued as a whole, so a
        caller that stops between lists (on Ctrl-C) knows every job it queued. A submission of
        more than one write batch holds its batch open (a hold of its own, ``BatchSpec.hold``)
        until it ends or its caller stops early; with ``keep_open``, the batch stays held after
        it too (``KEPT_OPEN``), until ``close_batch``."""
        info = self.check_model(model, top_k)
        callback = None if callback_url is None else validate_callback_url(callback_url)
        it = iter(requests)
        chunk = list(itertools.islice(it, _WRITE_BATCH))
        spec = _batch_spec(batch, output, callback, many=len(chunk) > 1 or keep_open)
        template = Job(
            id="",
            uri="",
            model=info.name,
            top_k=top_k,
            callback_url=callback,
            version=info.version,
            priority=validate_priority(priority),
            batch=None if spec is None else spec.id,
            deadline=None if deadline is None else validate_deadline(deadline),
            ttl_s=self.ttl_s if ttl_s is None else validate_ttl_s(ttl_s),
        )
        if spec is not None and (keep_open or len(chunk) == _WRITE_BATCH):  # more may follow
            spec = replace(spec, hold=KEPT_OPEN if keep_open else new_hold())
        try:
            while chunk:
                yield self._submit_batch(chunk, template, spec)
                chunk = list(itertools.islice(it, _WRITE_BATCH))
        finally:
            if spec is not None and spec.hold is not None and not keep_open:
                self._release(spec.id, spec.hold)

    def _release(self, batch_id: str, hold: str) -> None:
        """Release this submission's hold on its batch, retried a few times; if Redis still
        fails, the batch stays open until closed, and the log says so."""
        for wait in (0.2, 1.0, 0.0):
            try:
                self.store.close_batch(batch_id, hold)
                return
            except redis.RedisError as e:
                error = e
                time.sleep(wait)
        log.warning(
            "batch %s stays open (it cannot finish) until closed: %s; close it with "
            "Client.close_batch or `python -m producer batch close %s`", batch_id, error, batch_id
        )  # fmt: skip

    def check_model(self, model: str, top_k: int) -> ModelInfo:
        """The version that will serve ``model`` (``name`` or ``name@version``); refuses, before
        anything is queued, a model or version no worker serves or a top_k it cannot give."""
        name, version = parse_model_ref(model)
        validate_top_k(top_k)
        info = registry.get_model(self.redis, name, version)
        if info is None:
            raise UnsupportedModel(self._unknown(name, version))
        validate_top_k(top_k, info.num_classes)
        return info

    def _unknown(self, name: str, version: str | None) -> str:
        if version is not None and name in registry.known_models(self.redis):
            known = ", ".join(registry.versions(self.redis, name))
            return f"model {name!r} has no version {version!r} (versions: {known})"
        known = ", ".join(registry.known_models(self.redis)) or "none yet"
        return (
            f"no worker has registered model {name!r} (registered: {known}); "
            f"start one with: python -m worker --model {name}"
        )

    def _submit_batch(
        self, batch: list[SubmitRequest | str], template: Job, spec: BatchSpec | None
    ) -> list[Job]:
        now = timestamp(time.time())
        jobs = [self._new_job(r, template, now) for r in batch]
        self._refuse_conflicts(jobs, [j for j, r in zip(jobs, batch, strict=True) if _named(r)])
        created = self.store.create_many(jobs, spec)
        fresh = [j for j, c in zip(jobs, created, strict=True) if c]
        self._enqueue(fresh)
        if len(fresh) == len(jobs):
            return jobs
        old = [j for j, c in zip(jobs, created, strict=True) if not c]
        existing = self._existing(old)
        # Only a submission racing this one gets here with a conflict; the fresh jobs are queued.
        _raise_on_conflict(old, existing)
        return [j if c else existing.get(j.id, j) for j, c in zip(jobs, created, strict=True)]

    def _new_job(self, request: SubmitRequest | str, template: Job, now: float) -> Job:
        """A queued job from ``request``, for ``template``'s model, version, top_k, priority
        and callback URL (unless the request names its own)."""
        if isinstance(request, str):
            request = SubmitRequest(request)
        uri = absolute_uri(request.uri) if self.absolute_paths else request.uri
        job_id = new_job_id() if request.job_id is None else validate_job_id(request.job_id)
        callback = template.callback_url
        if request.callback_url is not None:
            callback = validate_callback_url(request.callback_url)
        return replace(
            template, id=job_id, uri=validate_uri(uri), callback_url=callback, submitted=now
        )

    def _refuse_conflicts(self, jobs: list[Job], named: list[Job]) -> None:
        """Refuse the whole batch, before anything is written, if a caller-chosen ID is taken
        by a different request (in Redis, or earlier in the same batch)."""
        if not named:
            return
        seen: dict[str, Job] = {}
        for job in jobs:
            _raise_on_conflict([job], seen)
            seen.setdefault(job.id, job)
        _raise_on_conflict(named, self._existing(named))

    def _existing(self, jobs: Sequence[Job]) -> dict[str, Job]:
        return {j.id: j for j in self.store.get_many([j.id for j in jobs]) if j is not None}

    def resend(self, job_ids: Sequence[str]) -> list[str]:
        """Send the jobs of ``job_ids`` that are still queued again; returns their IDs.

        For a message that never ran (dead-lettered): final or running jobs are left alone."""
        found = self.store.get_many(job_ids)
        queued = [p for j in found if j is not None and j.status == QUEUED and (p := self._pin(j))]
        for route in dict.fromkeys(_route(j) for j in queued):
            self._enqueue([j for j in queued if _route(j) == route])
        return [j.id for j in queued]

    def _pin(self, job: Job) -> Job | None:
        """``job`` with a version: a record from before versions existed is checked against
        its model's default version now, or left alone (None) if that version cannot take it."""
        if job.version is not None:
            return job
        try:
            return replace(job, version=self.check_model(job.model, job.top_k).version)
        except ServiceError:
            return None

    def _enqueue(self, jobs: Sequence[Job]) -> None:
        """Send ``jobs``, all of one model version and priority, in messages of a chunk each."""
        if not jobs:
            return
        queue = keys.queue_name(*_route(jobs[0]))
        sent = 0
        try:
            with self.celery.producer_or_acquire() as producer:
                for count in message_sizes(len(jobs), self.chunk_size):
                    ids = [j.id for j in jobs[sent : sent + count]]
                    self.celery.send_task(
                        TASK_NAME, args=[ids], queue=queue, routing_key=queue, producer=producer
                    )
                    sent += count
        except Exception as e:
            # Records without a message would stay queued forever: fail them visibly instead.
            error = ErrorInfo(Unavailable.type, f"could not enqueue the job: {e}")
            self.store.finish_many([j.failed(error, time.time()) for j in jobs[sent:]])
            raise Unavailable(f"could not enqueue {len(jobs) - sent} jobs: {e}") from e

    def cancel(self, job_id: str) -> Job:
        """Cancel one job and return its record, now ``cancelled``: a queued job never runs, a
        running one's result is discarded. Raises ``NotFound`` for an unknown (or expired) ID
        and ``AlreadyFinal``, changing nothing, for a job that is final already."""
        outcome = self.cancel_many([job_id])[0]
        job = self.store.get(job_id)
        if outcome is CancelOutcome.MISSING or job is None:
            raise NotFound(f"no job {job_id!r} (never submitted, or its record expired)")
        if outcome is CancelOutcome.CORRUPT:
            raise MalformedRecord(f"job record {job_id!r} is not a job; left as it is")
        if outcome is CancelOutcome.ALREADY_FINAL:
            raise AlreadyFinal(f"job {job_id} is already {job.status}; nothing was changed")
        return job

    def cancel_many(self, job_ids: Sequence[str]) -> list[CancelOutcome]:
        """Cancel every queued or running job of ``job_ids``, in input order, without raising
        for the others: each answer says what was found (and done)."""
        ids = [validate_job_id(job_id) for job_id in job_ids]
        outcomes: list[CancelOutcome] = []
        for start in range(0, len(ids), _WRITE_BATCH):
            outcomes += self.store.cancel_many(ids[start : start + _WRITE_BATCH], time.time())
        return outcomes

    def get(self, job_id: str) -> Job | None:
        return self.store.get(job_id)

    def get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        return self.store.get_many(job_ids)

    def wait(self, job_id: str, timeout: float) -> Job | None:
        return self.wait_many([job_id], timeout)[0]

    def wait_many(self, job_ids: Sequence[str], timeout: float) -> list[Job | None]:
        """The records once each is final or ``timeout`` seconds have passed, in input order.

        Blocks on the workers' finished-jobs channel rather than polling. An announced job is
        final, so it is not read until every job is: the records are read once, at the end,
        unless a sweep (before waiting, and after each quiet second, in case an announcement
        was missed across a reconnect) found them final first.
        """
        latest: dict[str, Job | None] = {}
        pending = dict.fromkeys(job_ids)
        announced: list[str] = []  # final, not read yet
        deadline = time.monotonic() + timeout
        with Announcements(self._shards_of(list(pending))) as announcements:
            pending = self._sweep(pending, latest)
            read_at = time.monotonic()
            while (pending or announced) and (left := deadline - time.monotonic()) > 0:
                if not pending:
                    # Every job was announced: read them; any not final (none should be) waits on.
                    pending, announced = dict.fromkeys(self._refresh(announced, latest)), []
                    continue
                ids = announcements.get(timeout=min(defaults.WAIT_RECHECK_S, left))
                if ids is None:
                    # Not only after a quiet second: the subscription's confirmation is None too.
                    if time.monotonic() - read_at >= defaults.WAIT_RECHECK_S:
                        pending, read_at = self._sweep(pending, latest), time.monotonic()
                    continue
                for job_id in ids:
                    if job_id in pending:
                        del pending[job_id]
                        announced.append(job_id)
        self._refresh([*pending, *announced], latest)
        return [latest.get(i) for i in job_ids]

    def as_finished(
        self, job_ids: Sequence[str], timeout: float, *, stop: Callable[[], bool] = lambda: False
    ) -> Iterator[tuple[str, Job | None]]:
        """Yield ``(id, record)`` for each job as it becomes final, in the order they finish.

        A missing record (never submitted, or expired) counts as final, with ``None``. After
        ``timeout`` seconds, or once ``stop()`` is true (checked at least every recheck
        interval), the jobs not final yet follow, in input order, with their latest records.
        """
        pending = list(dict.fromkeys(job_ids))
        deadline = time.monotonic() + timeout
        with Announcements(self._shards_of(pending)) as announcements:
            pending = yield from self._yield_final(pending)
            while pending and not stop() and (left := deadline - time.monotonic()) > 0:
                ids = announcements.get(timeout=min(defaults.WAIT_RECHECK_S, left))
                if ids is None:
                    pending = yield from self._yield_final(pending)
                    continue
                announced = set(ids)
                if any(i in announced for i in pending):
                    pending = yield from self._yield_final(pending, announced)
        yield from self._yield_final(pending, last=True)

    def _yield_final(
        self, pending: list[str], only: set[str] | None = None, last: bool = False
    ) -> Generator[tuple[str, Job | None], None, list[str]]:
        """Re-read ``pending`` (or those of it in ``only``); yield the final ones (every one when
        ``last``); return those still pending."""
        latest: dict[str, Job | None] = {}
        if only is None and not last:
            self._sweep(dict.fromkeys(pending), latest)
        else:
            self._refresh([i for i in pending if only is None or i in only], latest)
        still = []
        for job_id in pending:
            if job_id in latest and (last or _final(latest[job_id])):
                yield job_id, latest[job_id]
            else:
                still.append(job_id)
        return still

    def _shards_of(self, job_ids: Sequence[str]) -> list[redis.Redis]:
        """The Redis instances that announce ``job_ids`` when they finish."""
        count = len(self.store.clients)
        return [self.store.clients[i] for i in sorted({shard_of(j, count) for j in job_ids})]

    def _sweep(self, job_ids: dict[str, None], latest: dict[str, Job | None]) -> dict[str, None]:
        """Reads ``job_ids`` into ``latest`` where final (None where there is no record), only
        their status for the rest; returns the rest."""
        still: dict[str, None] = {}
        ids = list(job_ids)
        for start in range(0, len(ids), _WRITE_BATCH):
            chunk = ids[start : start + _WRITE_BATCH]
            for job_id, job in zip(chunk, self.store.get_final_many(chunk), strict=True):
                if job is UNSETTLED:
                    still[job_id] = None
                else:
                    latest[job_id] = job
        return still

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

    def batch(self, batch_id: str) -> Batch | None:
        """The batch's counters, progress and times; None when unknown or expired."""
        return self.store.batch(validate_batch_id(batch_id))

    def cancel_batch(self, batch_id: str) -> tuple[int, Batch]:
        """Cancel every job of the batch that is not final yet; returns how many were
        cancelled and the batch afterwards. Raises ``NotFound`` for an unknown (or expired)
        batch and ``AlreadyFinal``, changing nothing, for a finished one."""
        batch_id = validate_batch_id(batch_id)
        state = self._known_batch(batch_id)
        if state.is_finished:
            raise AlreadyFinal(f"batch {batch_id} is finished already; nothing was changed")
        cancelled = 0
        for ids in self.store.batch_job_ids(batch_id):
            cancelled += sum(outcome.cancelled for outcome in self.cancel_many(ids))
        self.store.close_batch(batch_id)  # a batch held open ends with its cancelled jobs
        after = self.store.batch(batch_id)
        return cancelled, after or state

    def close_batch(self, batch_id: str) -> Batch:
        """Release every hold on the batch (``keep_open``'s, a submission's that died midway,
        and one still running) so that it finishes: now, if all its jobs are final, else when
        the last of them is. Returns the batch; raises ``NotFound`` for an unknown (or expired)
        batch. Closing a closed batch changes nothing."""
        batch_id = validate_batch_id(batch_id)
        self.store.close_batch(batch_id)
        return self._known_batch(batch_id)

    def _known_batch(self, batch_id: str) -> Batch:
        """The batch; ``NotFound`` when no shard has it (unknown, or expired)."""
        state = self.store.batch(batch_id)
        if state is None:
            raise NotFound(f"no batch {batch_id!r} (never submitted, or expired)")
        return state

    def batch_results(
        self, batch_id: str, cursor: str | None = None, limit: int = defaults.BATCH_PAGE
    ) -> BatchPage:
        """The records of up to ``limit`` of the batch's jobs that are final, in the order they
        became final, after ``cursor`` (None: from the first). Pass the page's ``cursor`` to
        read on; a page is ``complete`` once the batch is finished and nothing follows it.
        A record gone from Redis (expired, or expired early once the sink wrote it) is None."""
        ids, after, complete = self.batch_result_ids(batch_id, cursor, limit)
        records = [r for chunk in self.iter_records(ids) for r in chunk]
        return BatchPage(batch_id, records, after, complete)

    def batch_result_ids(
        self, batch_id: str, cursor: str | None = None, limit: int = defaults.BATCH_PAGE
    ) -> tuple[list[str], str, bool]:
        """``batch_results`` without the records: (IDs, cursor, complete)."""
        batch_id = validate_batch_id(batch_id)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidRequest(f"limit must be a positive integer, got {limit!r}")
        state = self._known_batch(batch_id)
        ids, after = self.store.batch_results(batch_id, cursor, limit)
        return ids, after, state.is_finished and len(ids) < limit

    def iter_records(self, job_ids: Sequence[str]) -> Iterator[list[tuple[str, Job | None]]]:
        """``(id, record)`` pairs of ``job_ids``, read a write batch at a time."""
        for start in range(0, len(job_ids), _WRITE_BATCH):
            chunk = job_ids[start : start + _WRITE_BATCH]
            yield list(zip(chunk, self.store.get_many(chunk), strict=True))

    def iter_batch_results(
        self, batch_id: str, cursor: str | None = None, *, follow: float = 0.0
    ) -> Iterator[BatchPage]:
        """Pages of ``batch_results`` until the last one so far; with ``follow`` seconds, until
        the batch is complete or that long has passed (polling once a second when idle)."""
        deadline = time.monotonic() + follow
        while True:
            page = self.batch_results(batch_id, cursor)
            cursor = page.cursor
            yield page
            if page.complete:
                return
            if len(page.records) == defaults.BATCH_PAGE:
                continue  # more are there already
            if time.monotonic() >= deadline:
                return
            time.sleep(min(defaults.WAIT_RECHECK_S, max(deadline - time.monotonic(), 0)))

    def result(self, job_id: str, timeout: float) -> list[Prediction]:
        """A job's predictions, waiting up to ``timeout``; raises ``JobFailed`` if it failed, was
        cancelled or expired."""
        job = self.wait(job_id, timeout)
        if job is None:
            raise ServiceError(f"no job {job_id!r} (never submitted, or its record expired)")
        if job.error is not None:
            raise JobFailed(job.id, job.error.type, job.error.message)
        if job.status in _ENDED_UNRUN:
            raise JobFailed(job.id, str(job.status), _ENDED_UNRUN[job.status])
        if job.predictions is None:
            raise TimeoutError(f"job {job_id} is still {job.status} after {timeout} s")
        return list(job.predictions)


@dataclass(frozen=True)
class BatchPage:
    """One page of a batch's results: ``(id, record)`` pairs, the cursor that reads on, and
    whether the batch is finished with nothing after this page."""

    batch: str
    records: list[tuple[str, Job | None]]
    cursor: str
    complete: bool


def _batch_spec(
    batch: str | None, output: str | None, callback_url: str | None, *, many: bool
) -> BatchSpec | None:
    """The submission's batch: the one named, else a new one for many jobs or an output."""
    if output is not None:
        validate_output(output)
    if batch is None and not many and output is None:
        return None
    batch_id = new_batch_id() if batch is None else validate_batch_id(batch)
    return BatchSpec(batch_id, callback_url, output)


# Why a job that ended without running has no predictions.
_ENDED_UNRUN = {
    CANCELLED: "the job was cancelled",
    EXPIRED: "the job's deadline passed before it started",
}


def _final(job: Job | None) -> bool:
    return job is None or job.is_final


def absolute_uri(uri: str) -> str:
    """A bare relative path joined to the working directory; anything with a scheme (s3://,
    http(s)://, file://) and absolute paths unchanged. Nothing is resolved or normalised."""
    if not isinstance(uri, str) or URI_SCHEME.match(uri) or os.path.isabs(uri) or not uri.strip():
        return uri
    return os.path.join(os.getcwd(), uri)


def _named(request: SubmitRequest | str) -> bool:
    return isinstance(request, SubmitRequest) and request.job_id is not None


def _same_request(a: Job, b: Job) -> bool:
    return (a.uri, a.model, a.top_k) == (b.uri, b.model, b.top_k)


def _raise_on_conflict(jobs: Iterable[Job], existing: dict[str, Job]) -> None:
    for job in jobs:
        old = existing.get(job.id)
        if old is not None and not _same_request(job, old):
            raise IdConflict(
                f"job ID {job.id!r} already exists for a different request "
                f"(uri {old.uri!r}, model {old.model!r}, top_k {old.top_k}); "
                "resubmit it unchanged to read it, or choose another ID"
            )


def message_sizes(jobs: int, most: int) -> list[int]:
    """How many of ``jobs`` IDs each queue message carries: at most ``most``, in as few
    messages as that allows, but in at least ``defaults.SPREAD_MESSAGES`` while each would
    still carry ``defaults.MIN_CHUNK_SIZE``; sizes differ by one at most."""
    spread = min(defaults.SPREAD_MESSAGES, math.ceil(jobs / defaults.MIN_CHUNK_SIZE))
    count = max(math.ceil(jobs / most), spread)
    return [jobs // count + (i < jobs % count) for i in range(count)] if jobs else []


def _route(job: Job) -> tuple[str, str, str]:
    """(model, version, priority): what picks a job's queue."""
    return job.model, job.version or "", job.priority
