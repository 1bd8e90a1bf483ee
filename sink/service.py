"""The sink's loop: events in, a part per batch written, then the events acknowledged.

Events are read with a consumer group (``defaults.SINK_GROUP``), and taken a few entries at a
time, up to ``part_records`` jobs (an entry holds the jobs of one store call; the rest stay
pending for the next step). Each read asks for about one part's worth of entries, at the size
the entries of the read before had, so that a backlog is not read again and again. The events
taken that belong to a batch with an ``output`` are written as that batch's parts of at most
``part_records`` records, named after the first event's stream ID; only then are they
acknowledged, in the same transaction that counts the batch's ``written`` records and (with
``record_ttl_s``) shortens the records' TTL in Redis. A sink killed at any moment leaves its
events pending: on restart it reads the same events again and writes the same part again
(replacing it), so every record reaches the output at least once, and readers drop repeats by
``id`` (``outputs.read_records``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from contract import defaults, keys
from contract.events import Entry, EventGroup, JobEvent, event_jobs
from contract.store import JobStore
from sink.outputs import OutputRefused, Policy, Target, part_name, target

log = logging.getLogger("sink")

# An events entry as read: its stream ID and its events (``JobEvent.of``).
Read = tuple[bytes, list[JobEvent]]

# Longest the loop blocks waiting for events, in milliseconds.
MAX_BLOCK_MS = 1000
# Seconds the loop waits after a Redis error, or before writing a failed part again.
RETRY_S = 2.0
# Seconds a batch's output is remembered before it is read from Redis again.
OUTPUT_CACHE_S = 5.0


@dataclass(frozen=True)
class SinkSettings:
    """How the sink runs; built once by the CLI from flags and environment."""

    policy: Policy
    consumer: str = "sink"
    group: str = defaults.SINK_GROUP
    # The most records one part holds; each read asks for about that many jobs' entries (an
    # entry holds the jobs one store call ended: from one to a few hundred).
    part_records: int = 2000
    # Seconds a record keeps in Redis once written to its output (None: its TTL is kept).
    record_ttl_s: int | None = None
    # Seconds an event may sit unacknowledged with another consumer before this one takes it.
    claim_idle_s: float = 60.0


class Sink:
    def __init__(
        self,
        client: redis.Redis,
        settings: SinkSettings,
        s3: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = client
        self.settings = settings
        self.store = JobStore(client)
        self._s3 = s3
        self._clock = clock
        self._outputs: dict[str, tuple[float, str | None]] = {}
        self._backlog_at = 0.0  # when to read this consumer's unacknowledged events again
        self._entry_jobs = 1.0  # jobs an entry held, on average, in the last read
        self.events = EventGroup(
            client, settings.group, settings.consumer, settings.claim_idle_s, clock
        )

    def setup(self) -> None:
        self.events.setup()

    def run(self, stop: threading.Event) -> None:
        self.setup()
        log.info("writing batch outputs (group %s, consumer %s)", self.settings.group,
                 self.settings.consumer)  # fmt: skip
        while not stop.is_set():
            try:
                self.step(MAX_BLOCK_MS)
            except redis.RedisError as e:  # nothing is lost: try again shortly
                log.warning("Redis: %s; retrying in %g s", e, RETRY_S)
                stop.wait(RETRY_S)

    def step(self, block_ms: int | None = None) -> int:
        """Read events (this consumer's unacknowledged ones first), write their parts and
        acknowledge them; returns how many entries it took (0: none were waiting)."""
        if self.events.claim_abandoned(self.settings.part_records):
            self._backlog_at = 0.0  # they are now this consumer's pending events
        count = max(1, math.ceil(self.settings.part_records / self._entry_jobs))
        entries: list[Entry] = []
        if self._clock() >= self._backlog_at:
            entries = self.events.read("0", count, None)
            if not entries:
                self._backlog_at = float("inf")  # until a write fails or events are claimed
        if not entries:
            entries = self.events.read(">", count, block_ms)
        read = [(entry_id, JobEvent.of(fields)) for entry_id, fields in entries]
        if read:
            self._entry_jobs = max(1.0, sum(len(events) for _, events in read) / len(read))
        taken = _up_to(read, self.settings.part_records)
        if taken and not self.write(taken):
            self._backlog_at = self._clock() + RETRY_S
        elif len(taken) < len(entries):
            self._backlog_at = 0.0  # the rest are this consumer's pending events: next
        return len(taken)

    def write(self, entries: Sequence[Read]) -> bool:
        """Write the parts ``entries`` (stream IDs and their events) call for and acknowledge
        what was written or needs no writing; False when some part could not be written (its
        events stay pending)."""
        by_batch: dict[str, list[tuple[bytes, list[str]]]] = {}  # entry IDs and their jobs
        done: list[bytes] = []
        for entry_id, events in entries:
            ids = [e.job_id for e in events if e.job_id]  # none: a batch's own finish event
            batch = events[0].batch if events else ""
            output = self._output(batch) if batch and ids else None
            if output is None:
                done.append(entry_id)
            else:
                by_batch.setdefault(batch, []).append((entry_id, ids))
        pipe = self.redis.pipeline(transaction=True)
        ok = True
        for batch, batch_entries in by_batch.items():
            written = self._write_parts(batch, batch_entries, pipe)
            if written is None:
                ok = False
            else:
                done += [entry_id for entry_id, _ in batch_entries]
        if done:
            pipe.xack(keys.events_stream(), self.settings.group, *done)
        pipe.execute()
        return ok

    def _write_parts(
        self, batch: str, entries: Sequence[tuple[bytes, list[str]]], pipe: Any
    ) -> int | None:
        """Write the records of ``entries`` (stream IDs and job IDs) as ``batch``'s parts, at
        most ``part_records`` each; adds to ``pipe`` what counts them; returns how many were
        written, None when it failed (to retry)."""
        output = self._output(batch)
        assert output is not None
        ids = [job_id for _, job_ids in entries for job_id in job_ids]
        jobs = [j for j in event_jobs(self.store, ids, "not written") if j is not None]
        first, size = keys.text(entries[0][0]), self.settings.part_records
        try:
            where: Target = target(output, self.settings.policy, self._s3)
            for n, at in enumerate(range(0, len(jobs), size)):
                body = "".join(j.encode() + "\n" for j in jobs[at : at + size]).encode()
                where.write(part_name(first if n == 0 else f"{first}-{n}"), body)
        except OutputRefused as e:  # never going to work: say so on the batch, drop the events
            log.warning("batch %s: %s", batch, e)
            pipe.hset(keys.batch_key(batch), "output_error", str(e))
            return 0
        except Exception as e:  # a full disk, S3 throttling: the events stay pending
            log.warning("batch %s: could not write to %s: %s; retrying", batch, output, e)
            return None
        pipe.hincrby(keys.batch_key(batch), "written", len(jobs))
        if self.settings.record_ttl_s is not None:
            for job in jobs:
                pipe.expire(keys.job_key(job.id), self.settings.record_ttl_s, lt=True)
        if len(jobs) < len(ids):
            log.warning("batch %s: %d records had expired before they were written",
                        batch, len(ids) - len(jobs))  # fmt: skip
        return len(jobs)

    def _output(self, batch: str) -> str | None:
        """The batch's output, or None; remembered for a few seconds."""
        now = self._clock()
        cached = self._outputs.get(batch)
        if cached is not None and now - cached[0] < OUTPUT_CACHE_S:
            return cached[1]
        raw = self.redis.hget(keys.batch_key(batch), "output")
        output = None if raw is None else keys.text(raw)
        if len(self._outputs) > 10_000:
            self._outputs.clear()
        self._outputs[batch] = (now, output)
        return output


def _up_to(entries: Sequence[Read], jobs: int) -> list[Read]:
    """The first of ``entries`` whose jobs add up to at most ``jobs``; at least one entry."""
    total = 0
    for n, (_, events) in enumerate(entries):
        total += len(events)
        if total > jobs and n > 0:
            return list(entries[:n])
    return list(entries)
