"""The events stream (``keys.events_stream()``) read by a consumer group: each reader (the webhook
sender, the results sink, a service of yours) has its group, and the consumers of a group share
its events, each acknowledging what it handled.

An entry holds the jobs one store call ended with one status: ``ids`` (space-separated job IDs),
``status`` and ``batch`` (their batch, empty when none). A batch's own finish event has no IDs,
status ``batch_finished`` and its batch. ``JobEvent.of`` reads an entry into its events, and
an entry of the form before (``id``: one job) too.

``EventGroup`` is what those readers share: the group made if missing, new events or this
consumer's unacknowledged ones, and taking over what a dead consumer left pending.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from contract import keys
from contract.errors import MalformedRecord
from contract.job import Job
from contract.store import JobStore

log = logging.getLogger(__name__)

# An entry as XREADGROUP gives it: its stream ID and its fields.
Entry = tuple[bytes, dict[bytes, bytes]]


@dataclass(frozen=True)
class JobEvent:
    """One job's completion event, or (``job_id`` empty) a batch's own finish event."""

    job_id: str
    status: str
    batch: str

    @classmethod
    def of(cls, fields: Mapping[bytes, bytes] | None) -> list[JobEvent]:
        """The events of one entry's fields, in the order its jobs ended; a batch's finish
        event is one event without a job ID. An entry without fields (deleted) has none."""
        if not fields:
            return []
        status, batch = keys.text(fields.get(b"status", b"")), keys.text(fields.get(b"batch", b""))
        ids = keys.text(fields.get(b"ids", fields.get(b"id", b""))).split()  # "id": before 2026-12
        return [cls(i, status, batch) for i in ids] or [cls("", status, batch)]


class EventGroup:
    """One consumer of one consumer group on the events stream."""

    def __init__(
        self,
        client: redis.Redis,
        group: str,
        consumer: str,
        claim_idle_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = client
        self.group = group
        self.consumer = consumer
        self.claim_idle_s = claim_idle_s
        self._clock = clock
        self._last_claim = -float("inf")

    def setup(self) -> None:
        """Create the group (reading the stream from its start) unless it exists."""
        try:
            self.redis.xgroup_create(keys.events_stream(), self.group, "0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def read(self, start: str, count: int, block_ms: int | None) -> list[Entry]:
        """New events (``start`` ">") or this consumer's unacknowledged ones ("0"). An entry
        the stream's trimming removed while it was pending comes without fields: logged, as its
        jobs' events are lost to this reader."""
        reply: Any = self.redis.xreadgroup(
            self.group, self.consumer, {keys.events_stream(): start}, count=count, block=block_ms
        )
        entries: list[Entry] = list(reply[0][1]) if reply else []
        if gone := sum(not fields for _, fields in entries):
            log.warning(
                "group %s: %d pending events entries were trimmed from the stream before they "
                "were handled (the reader fell about EVENTS_MAX_BYTES behind); their events are "
                "lost",
                self.group,
                gone,
            )
        return entries

    def claim_abandoned(self, count: int) -> bool:
        """Take over events another consumer read but never acknowledged (it died), at most
        every ``claim_idle_s``; True when some became this consumer's pending events."""
        now = self._clock()
        if now - self._last_claim < self.claim_idle_s:
            return False
        self._last_claim = now
        claimed: Any = self.redis.xautoclaim(
            keys.events_stream(),
            self.group,
            self.consumer,
            min_idle_time=int(self.claim_idle_s * 1000),
            count=count,
            justid=True,
        )
        return bool(claimed)  # with justid, redis-py answers the list of IDs taken


def event_jobs(store: JobStore, job_ids: Sequence[str], skipped: str) -> list[Job | None]:
    """The records events name, in one read; a record that cannot be read counts as gone
    (logged, saying what is ``skipped`` for it) and the others are still read."""
    try:
        return store.get_many(job_ids)
    except MalformedRecord:
        return [_event_job(store, i, skipped) for i in job_ids]


def _event_job(store: JobStore, job_id: str, skipped: str) -> Job | None:
    try:
        return store.get(job_id)
    except MalformedRecord as e:
        log.warning("event for job %s: %s; %s", job_id, e, skipped)
        return None
