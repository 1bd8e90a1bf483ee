"""The sink's loop: events in, a part per batch written, then the events acknowledged.

Events are read with a consumer group (``defaults.SINK_GROUP``). The events of one read that
belong to a batch with an ``output`` are written as one part per batch, named after the first
event's stream ID; only then are they acknowledged, in the same transaction that counts the
batch's ``written`` records and (with ``record_ttl_s``) shortens the records' TTL in Redis. A
sink killed at any moment leaves its events pending: on restart it reads the same events again
and writes the same part again (replacing it), so every record reaches the output at least
once, and readers drop repeats by ``id`` (``outputs.read_records``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from contract import defaults, keys
from contract.events import Entry, EventGroup, event_jobs
from contract.store import JobStore
from sink.outputs import OutputRefused, Policy, Target, part_name, target

log = logging.getLogger("sink")

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
    # Events read, and at most records written in one part, per read.
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
        acknowledge them; returns how many events were read."""
        count = self.settings.part_records
        if self.events.claim_abandoned(count):
            self._backlog_at = 0.0  # they are now this consumer's pending events
        entries: list[Entry] = []
        if self._clock() >= self._backlog_at:
            entries = self.events.read("0", count, None)
            if not entries:
                self._backlog_at = float("inf")  # until a write fails or events are claimed
        if not entries:
            entries = self.events.read(">", count, block_ms)
        if entries and not self.write(entries):
            self._backlog_at = self._clock() + RETRY_S
        return len(entries)

    def write(self, entries: Sequence[Entry]) -> bool:
        """Write the parts ``entries`` call for and acknowledge what was written or needs no
        writing; False when some part could not be written (its events stay pending)."""
        by_batch: dict[str, list[Entry]] = {}
        done: list[bytes] = []
        for entry in entries:
            batch = keys.text(entry[1].get(b"batch", b""))
            job_event = bool(entry[1].get(b"id"))  # not a batch's own finish event
            output = self._output(batch) if batch and job_event else None
            if output is None:
                done.append(entry[0])
            else:
                by_batch.setdefault(batch, []).append(entry)
        pipe = self.redis.pipeline(transaction=True)
        ok = True
        for batch, batch_entries in by_batch.items():
            written = self._write_part(batch, batch_entries, pipe)
            if written is None:
                ok = False
            else:
                done += [e[0] for e in batch_entries]
        if done:
            pipe.xack(keys.events_stream(), self.settings.group, *done)
        pipe.execute()
        return ok

    def _write_part(self, batch: str, entries: Sequence[Entry], pipe: Any) -> int | None:
        """Write the records of ``entries`` as one part of ``batch``'s output; adds to ``pipe``
        what counts them; returns how many were written, None when it failed (to retry)."""
        output = self._output(batch)
        assert output is not None
        ids = [keys.text(e[1].get(b"id", b"")) for e in entries]
        jobs = [j for j in event_jobs(self.store, ids, "not written") if j is not None]
        try:
            where: Target = target(output, self.settings.policy, self._s3)
            if jobs:
                body = "".join(j.encode() + "\n" for j in jobs).encode()
                where.write(part_name(keys.text(entries[0][0])), body)
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
