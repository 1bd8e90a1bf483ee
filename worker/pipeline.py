"""Micro-batching: jobs from many messages meet here and go through the device together.

Three threads, each a stage, joined by bounded queues, so the stages overlap:

    assemble  waits for up to ``max_batch`` items or ``max_wait_s``, and builds the device batch
    infer     runs the forward pass, softmax and top-k; a failing batch is split to find the culprit
    store     writes final records, and announces them, in one Redis round trip: while more items
              are in flight it gathers the results of several device batches, up to
              ``store_batch`` or ``store_wait_s`` (each call costs Redis per command it runs)

With ``inline_infer`` (a CPU device) the assemble thread runs the infer stage itself: there the
two would only take turns at the same cores.

Every item leaves with exactly one final record: done or failed. Its group (``Completion``: one
message's items) resolves only once every record of it is stored, so the Celery task that owns
the message can acknowledge it.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from contract.errors import InternalError, NotAnImage, ServiceError, as_service_error
from contract.job import ErrorInfo, Job, Prediction
from contract.shards import ShardedStore
from worker.inference import Classifier, Payload, TopK
from worker.metrics import Metrics
from worker.resilience import retry_redis
from worker.settings import STORE_BATCH, STORE_WAIT_MS

log = logging.getLogger(__name__)


class _Stop:
    """The end-of-work marker each stage passes on to the next before it exits."""


_STOP = _Stop()
# Exit status of a worker whose pipeline cannot go on (a stage died, or the device broke):
# like a killed worker's, its unacknowledged messages go to other workers.
EXIT_PIPELINE_DEAD = 70


class DeviceLost(RuntimeError):
    """A known-good input failed too: the device is broken, not the job that failed on it."""


class Completion:
    """Resolves once every item of a group (one message's jobs) has left the pipeline: its
    record stored, or the store failed. One lock and one event a group: a future a job cost
    more than a local file's whole fetch (README "Per-job cost")."""

    def __init__(self, count: int) -> None:
        self._left = count
        self._lock = threading.Lock()
        self._done = threading.Event()
        if count <= 0:
            self._done.set()

    def count_down(self, count: int) -> None:
        with self._lock:
            self._left -= count
            finished = self._left <= 0
        if finished:
            self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """True once the whole group has left the pipeline; False at the timeout."""
        return self._done.wait(timeout)


@dataclass(eq=False)
class WorkItem:
    job: Job
    group: Completion = field(default_factory=lambda: Completion(1))
    payload: Payload | None = None
    error: ServiceError | None = None
    alone: bool = False
    record: Job | None = None
    # Once its group has left the pipeline: its stored final record, or why it was not stored.
    stored: Job | None = None
    store_error: Exception | None = None

    def result(self, timeout: float | None = None) -> Job:
        """Its stored final record, once its whole group has left the pipeline; raises the
        store's error if its record could not be stored."""
        if not self.group.wait(timeout):
            raise TimeoutError(f"job {self.job.id} was not stored within {timeout} s")
        if self.store_error is not None:
            raise self.store_error
        assert self.stored is not None
        return self.stored


@dataclass(frozen=True)
class _Batch:
    items: list[WorkItem]
    inputs: torch.Tensor | None = None


class Pipeline:
    def __init__(
        self,
        classifier: Classifier,
        store: ShardedStore,
        metrics: Metrics,
        *,
        max_batch: int,
        max_wait_s: float,
        store_batch: int = STORE_BATCH,
        store_wait_s: float = STORE_WAIT_MS / 1000,
        inline_infer: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.classifier = classifier
        self.store = store
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.store_batch = max(store_batch, max_batch)
        self.store_wait_s = store_wait_s
        # The assemble thread runs each batch itself: on a CPU device the two stages would only
        # take turns at the same cores and GIL, and the hand-over costs a wake-up a batch.
        self.inline_infer = inline_infer
        self.clock = clock
        self._inbox: queue.Queue[list[WorkItem] | _Stop] = queue.Queue()
        # Items taken from the inbox but not batched yet (only the assemble thread uses it).
        self._pending: deque[WorkItem] = deque()
        self._lock = threading.Lock()
        # Items announced by ``expect`` and not submitted yet.
        self._expected = 0
        # Items expected or submitted that have not reached the store stage yet.
        self._in_flight = 0
        self._to_infer: queue.Queue[_Batch | _Stop] = queue.Queue(maxsize=2)
        self._to_store: queue.Queue[list[WorkItem] | _Stop] = queue.Queue()
        # Results not handed to the store yet, and since when (only the thread that runs
        # inference uses them: ``_send_results``).
        self._results: list[WorkItem] = []
        self._results_since = 0.0
        stages = [self._assemble_loop, self._store_loop]
        if not inline_infer:
            stages.insert(1, self._infer_loop)
        self._threads = [
            threading.Thread(
                target=self._guard, args=(f,), name=f"pipeline-{f.__name__[1:]}", daemon=True
            )
            for f in stages
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def close(self, timeout_s: float) -> bool:
        """Finish what is queued, then stop the threads; False if one still ran at the timeout."""
        self._inbox.put(_STOP)
        return _join_all(self._threads, time.monotonic() + timeout_s)

    def dead_stages(self) -> list[str]:
        """Names of stage threads that are no longer running (none while healthy)."""
        return [t.name for t in self._threads if not t.is_alive()]

    def expect(self, count: int) -> None:
        """Say that ``count`` items are being fetched and will be submitted soon."""
        with self._lock:
            self._expected += count
            self._in_flight += count

    def submit(self, item: WorkItem) -> WorkItem:
        self.submit_many([item])
        return item

    def submit_many(self, items: list[WorkItem]) -> None:
        """Hand over loaded items in one queue operation (each counts down its own group)."""
        if not items:
            return
        with self._lock:
            announced = min(self._expected, len(items))
            self._expected -= announced
            self._in_flight += len(items) - announced
        self._inbox.put(items)

    def _more_coming(self) -> bool:
        with self._lock:
            return self._expected > 0

    def _guard(self, loop: Callable[[], None]) -> None:
        try:
            loop()
        except BaseException:
            # A dead stage would strand every job in flight while the worker looked alive:
            # exit instead, and the jobs are delivered again after the visibility timeout.
            log.critical("pipeline stage %s died; exiting", loop.__name__, exc_info=True)
            _exit_worker()

    # -- assemble ---------------------------------------------------------------------------

    def _assemble_loop(self) -> None:
        while (items := self._collect()) is not None:
            failed = [i for i in items if i.payload is None]
            ready = [i for i in items if i.payload is not None]
            if failed:
                self._to_store.put(failed)
            if ready:
                self._hand_on(self._assemble(ready))
        self._hand_on(_STOP)

    def _hand_on(self, batch: _Batch | _Stop) -> None:
        """To the infer thread, or, inline, through inference here and on to the store."""
        if not self.inline_infer:
            self._to_infer.put(batch)
        elif isinstance(batch, _Stop):
            self._flush_results()
            self._to_store.put(_STOP)
        else:
            self._infer_batch(batch)

    def _collect(self) -> list[WorkItem] | None:
        """Block for one item, then take more until the batch is full or the wait is over.

        The wait is skipped when nothing else is on its way, so a lone job at idle runs at once.
        """
        first = self._next(None)
        if isinstance(first, _Stop):
            return None
        items = [first]
        if first.alone:
            return items
        deadline = time.monotonic() + self.max_wait_s
        while len(items) < self.max_batch:
            if not self._pending and self._inbox.empty() and not self._more_coming():
                break
            try:
                item = self._next(max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if isinstance(item, _Stop):
                self._inbox.put(item)  # handled after this batch
                break
            if item.alone:
                self._pending.appendleft(item)  # a suspect runs by itself, after this batch
                break
            items.append(item)
        return items

    def _next(self, timeout: float | None) -> WorkItem | _Stop:
        """The next item submitted, waiting up to ``timeout`` (queue.Empty after it)."""
        if self.inline_infer and not self._pending and self._inbox.empty():
            self._flush_results()  # about to wait: what has finished goes to the store now
        if not self._pending:
            got = self._inbox.get(timeout=timeout)
            if isinstance(got, _Stop):
                return got
            self._pending.extend(got)
        return self._pending.popleft()

    def _assemble(self, items: list[WorkItem]) -> _Batch:
        started = time.perf_counter()
        try:
            payloads = [i.payload for i in items if i.payload is not None]
            inputs: torch.Tensor | None
            inputs, errors = self.classifier.make_batch(payloads)
        except Exception as e:
            log.exception("making a batch of %d failed", len(items))
            inputs, errors = None, dict.fromkeys(range(len(items)), e)
        if errors:
            _probe_device(self.classifier.device, next(iter(errors.values())))
        for n, error in errors.items():
            items[n].error = NotAnImage(f"the device could not decode the image: {error}")
        self._to_store_failed([i for i in items if i.error is not None])
        self.metrics.stage("device_preprocess", time.perf_counter() - started)
        return _Batch([i for i in items if i.error is None], inputs)

    def _to_store_failed(self, items: list[WorkItem]) -> None:
        if items:
            self._to_store.put(items)

    # -- infer ------------------------------------------------------------------------------

    def _infer_loop(self) -> None:
        while not isinstance(batch := self._next_batch(), _Stop):
            self._infer_batch(batch)
        self._flush_results()
        self._to_store.put(_STOP)

    def _next_batch(self) -> _Batch | _Stop:
        if self._to_infer.empty():
            self._flush_results()  # about to wait: what has finished goes to the store now
        return self._to_infer.get()

    def _infer_batch(self, batch: _Batch) -> None:
        if batch.items and batch.inputs is not None:
            started = time.monotonic()
            self._send_results(self._infer(batch.items, batch.inputs), started)

    def _send_results(self, items: list[WorkItem], started: float) -> None:
        """Results go to the store a group at a time: each hand-over wakes the store thread, and
        a wake-up costs more than a small model's batch. They leave once ``store_batch`` are
        waiting, once ``store_wait_s`` has passed since the first of them started its batch (so
        a slow model's results leave batch by batch), or when this thread is about to wait."""
        now = time.monotonic()
        if not self._results:
            self._results_since = started
        self._results.extend(items)
        if len(self._results) >= self.store_batch or now - self._results_since >= self.store_wait_s:
            self._flush_results()

    def _flush_results(self) -> None:
        if self._results:
            self._to_store.put(self._results)
            self._results = []

    def _infer(self, items: list[WorkItem], inputs: torch.Tensor) -> list[WorkItem]:
        """Run the batch; if it fails, split it in halves until the failing item is alone."""
        started = time.perf_counter()
        try:
            tops = self.classifier.predict(inputs, max(i.job.top_k for i in items))
        except Exception as e:
            if len(items) == 1:
                self._flush_results()  # stored before a lost device ends the process
                self._check_device(e)
                log.exception("inference failed for job %s", items[0].job.id)
                items[0].error = as_service_error(e)
                return items
            half = len(items) // 2
            log.warning("batch of %d failed (%s); splitting it", len(items), e)
            return self._infer(items[:half], inputs[:half]) + self._infer(
                items[half:], inputs[half:]
            )
        self.metrics.stage("inference", time.perf_counter() - started)
        self.metrics.batch(len(items))
        now = self.clock()
        for item, top in zip(items, tops, strict=True):
            item.record = self._done(item.job, top, now)
        return items

    def _check_device(self, cause: Exception) -> None:
        """Before failing a job, make sure the device still runs a known-good batch."""
        try:
            self.classifier.warmup()
        except Exception as e:
            raise DeviceLost(f"device failed a health check ({e}) after: {cause}") from e

    def _done(self, job: Job, top: TopK, now: float) -> Job:
        labels = self.classifier.loaded.categories
        predictions = [
            Prediction(labels[i], i, p)
            for p, i in zip(top.probabilities[: job.top_k], top.indices[: job.top_k], strict=True)
        ]
        loaded = self.classifier.loaded
        return job.done(predictions, loaded.weights_id, loaded.random_weights, now)

    # -- store ------------------------------------------------------------------------------

    def _store_loop(self) -> None:
        while (items := self._drain()) is not None:
            # The last group taken may carry the total past store_batch: no call is larger.
            for start in range(0, len(items), self.store_batch):
                self._store(items[start : start + self.store_batch])

    def _drain(self) -> list[WorkItem] | None:
        """What to store in one round trip: what has finished so far and, while more items are
        in flight, what finishes next, until there are ``store_batch`` or the store wait since
        the first is over. With nothing else in flight (a lone job at idle) it stores at once."""
        first = self._to_store.get()
        if isinstance(first, _Stop):
            return None
        items = list(first)
        deadline = time.monotonic() + self.store_wait_s
        more = self._reached_store(len(first))
        while more and len(items) < self.store_batch:
            try:
                # After the deadline this still takes what is queued already, without waiting.
                got = self._to_store.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if isinstance(got, _Stop):
                self._to_store.put(_STOP)  # handled once these are stored
                break
            items.extend(got)
            more = self._reached_store(len(got))
        return items

    def _reached_store(self, count: int) -> bool:
        """Count ``count`` items out of flight; True while others are still on their way."""
        with self._lock:
            self._in_flight = max(0, self._in_flight - count)
            return self._in_flight > 0

    def _store(self, items: list[WorkItem]) -> None:
        now = self.clock()
        records = [_final_record(i, now) for i in items]
        started = time.perf_counter()
        try:
            self._write(records)
        except Exception as e:
            log.error("could not store %d results: %s", len(records), e)
            for item in items:
                item.store_error = e
            _count_down(items)
            return
        self.metrics.stage("store", time.perf_counter() - started)
        self.metrics.finished(records)
        for item, record in zip(items, records, strict=True):
            item.stored = record
        _count_down(items)

    def _write(self, records: list[Job]) -> None:
        retry_redis(lambda: self.store.finish_many(records))


def _probe_device(device: torch.device, cause: Exception) -> None:
    """Before failing jobs the device could not decode, make sure it still works at all: once a
    CUDA context is corrupted (device-side assert, lost GPU), every call on it fails."""
    try:
        torch.ones(1, device=device).sum().item()
    except Exception as e:
        raise DeviceLost(f"device failed a health check ({e}) after: {cause}") from e


def _join_all(threads: list[threading.Thread], deadline: float) -> bool:
    """Join each thread in order, all by one deadline; True if every one has stopped."""
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return not any(t.is_alive() for t in threads)


def _exit_worker() -> None:
    logging.shutdown()
    os._exit(EXIT_PIPELINE_DEAD)


def _count_down(items: list[WorkItem]) -> None:
    """Tell each group how many of its items just left the pipeline."""
    for group, count in Counter(item.group for item in items).items():
        group.count_down(count)


def _final_record(item: WorkItem, now: float) -> Job:
    if item.error is None and item.record is not None:
        return item.record
    error = item.error or InternalError("the job left the pipeline without a result")
    return item.job.failed(ErrorInfo(error.type, str(error)), now)
