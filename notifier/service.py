"""The sender's loop: events in, deliveries scheduled, due deliveries POSTed.

Events are read with a consumer group and acknowledged in the same transaction that schedules
their deliveries, so an event is either still pending in the group or its webhook is in the
schedule: killing the sender at any moment loses nothing. A delivery leaves the schedule only
once delivered or given up (recorded in the dead list).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import redis

from contract import defaults, keys
from contract.batch import BATCH_FINISHED
from contract.batch import from_hashes as batch_from_hashes
from contract.events import Entry, EventGroup, JobEvent, event_jobs
from contract.job import Job
from contract.store import JobStore
from notifier.delivery import Outcome, Poster
from notifier.schedule import (
    Delivery,
    Schedule,
    backoff_s,
    batch_webhook_id,
    dead_entry,
    webhook_id,
)
from notifier.signing import Signer

log = logging.getLogger("notifier")

# Stream entries read per call (each up to a store call's jobs: 64 by default).
ENTRIES_PER_READ = 20
# Longest the loop blocks waiting for events, in milliseconds.
MAX_BLOCK_MS = 1000
# Seconds the loop waits after a Redis error before it tries again.
REDIS_RETRY_S = 1.0


@dataclass(frozen=True)
class NotifierSettings:
    """How the sender runs; built once by the CLI from flags and environment."""

    group: str = defaults.WEBHOOK_GROUP
    consumer: str = "notifier"
    max_age_s: float = defaults.WEBHOOK_MAX_AGE_S
    retry_base_s: float = defaults.WEBHOOK_RETRY_BASE_S
    retry_max_s: float = defaults.WEBHOOK_RETRY_MAX_S
    timeout_s: float = defaults.WEBHOOK_TIMEOUT_S
    concurrency: int = defaults.WEBHOOK_CONCURRENCY
    # Seconds an event may sit unacknowledged with another consumer before this one takes it.
    claim_idle_s: float = 60.0

    @property
    def lease_s(self) -> float:
        """How long a delivery in flight is hidden from other senders: past any POST's end."""
        return 2 * self.timeout_s + 1


def callback_for(job: Job) -> str | None:
    """Where a final job's webhook goes: its own callback_url (a batch's callback_url is given
    to each of its jobs that names none at submit)."""
    return job.callback_url


class Notifier:
    def __init__(
        self,
        client: redis.Redis,
        signer: Signer,
        poster: Poster,
        settings: NotifierSettings,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.redis = client
        self.signer = signer
        self.poster = poster
        self.settings = settings
        self.schedule = Schedule(client)
        self.store = JobStore(client)
        self._clock = clock
        self._rng = rng or random.Random()
        self._backlog = True  # events this consumer read before a restart, not acknowledged
        self.events = EventGroup(
            client, settings.group, settings.consumer, settings.claim_idle_s, clock
        )

    def setup(self) -> None:
        self.events.setup()

    def run(self, stop: threading.Event) -> None:
        self.setup()
        log.info(
            "sending webhooks (group %s, consumer %s)", self.settings.group, self.settings.consumer
        )
        with ThreadPoolExecutor(self.settings.concurrency, "webhook") as pool:
            while not stop.is_set():
                try:
                    self.take_events(self._block_ms())
                    self.deliver_due(pool)
                except redis.RedisError as e:  # nothing is lost: try again shortly
                    log.warning("Redis: %s; retrying in %g s", e, REDIS_RETRY_S)
                    stop.wait(REDIS_RETRY_S)

    def _block_ms(self) -> int | None:
        """How long to wait for events: not at all when deliveries are due."""
        due = self.schedule.next_due()
        wait = MAX_BLOCK_MS if due is None else (due - self._clock()) * 1000
        return None if wait < 1 else int(min(wait, MAX_BLOCK_MS))

    def take_events(self, block_ms: int | None = None) -> int:
        """Read events and schedule their webhooks; returns how many events were read.

        Events this consumer read before (and a restart cut short) come first, then new ones.
        """
        if self.events.claim_abandoned(ENTRIES_PER_READ):
            self._backlog = True  # they are now this consumer's pending events
        entries = self.events.read("0", ENTRIES_PER_READ, None) if self._backlog else []
        self._backlog = bool(entries)
        if not entries:
            entries = self.events.read(">", ENTRIES_PER_READ, block_ms)
        self._schedule(entries)
        return len(entries)

    def _schedule(self, entries: Sequence[Entry]) -> None:
        """Schedule the webhooks the entries call for and acknowledge them, in one transaction."""
        if not entries:
            return
        events = [event for _, fields in entries for event in JobEvent.of(fields)]
        jobs = event_jobs(self.store, [e.job_id for e in events], "no webhook")
        now = self._clock()
        pipe = self.redis.pipeline(transaction=True)
        for event, job in zip(events, jobs, strict=True):
            delivery = self._batch_delivery(event, now) or _delivery(event, job, now)
            if delivery is not None:
                self.schedule.add(pipe, delivery)
        pipe.xack(keys.events_stream(), self.settings.group, *(i for i, _ in entries))
        pipe.execute()

    def deliver_due(self, pool: ThreadPoolExecutor) -> int:
        """POST every due webhook; returns how many were tried."""
        batch = self.settings.concurrency * 4
        deliveries = self.schedule.lease(self._clock(), self.settings.lease_s, batch)
        if not deliveries:
            return 0
        bodies = self._bodies(deliveries)
        outcomes = list(pool.map(self._send, deliveries, bodies))
        self._settle(deliveries, outcomes)
        return len(deliveries)

    def _batch_delivery(self, event: JobEvent, now: float) -> Delivery | None:
        """The webhook of a batch's finish event, to the batch's callback_url, if it has one."""
        batch = event.batch
        if event.status != BATCH_FINISHED or not batch:
            return None
        raw = self.redis.hget(keys.batch_key(batch), "callback_url")
        return None if raw is None else Delivery(batch_webhook_id(batch), keys.text(raw), now)

    def _bodies(self, deliveries: Sequence[Delivery]) -> list[str | None]:
        """What each delivery POSTs: the job's final record, or the batch's state; None when
        it expired."""
        jobs = iter(
            event_jobs(self.store, [d.job_id for d in deliveries if d.batch is None], "no webhook")
        )
        bodies: list[str | None] = []
        for delivery in deliveries:
            if delivery.batch is None:
                job = next(jobs)
                bodies.append(None if job is None else job.encode())
            else:
                state = batch_from_hashes(delivery.batch, [self.store.batch_hash(delivery.batch)])
                bodies.append(None if state is None else json.dumps(state.to_dict()))
        return bodies

    def _send(self, delivery: Delivery, body: str | None) -> Outcome:
        if body is None:
            return Outcome(False, permanent=True, error="the record expired before delivery")
        headers = self.signer.headers(delivery.webhook_id, body, self._clock())
        return self.poster.post(delivery.url, body, headers)

    def _settle(self, deliveries: Sequence[Delivery], outcomes: Sequence[Outcome]) -> None:
        now = self._clock()
        delivered, retries, dead = [], [], []
        for delivery, outcome in zip(deliveries, outcomes, strict=True):
            tried = replace(delivery, attempts=delivery.attempts + 1)
            if outcome.delivered:
                delivered.append(tried)
            elif outcome.permanent or now - tried.first >= self.settings.max_age_s:
                log.warning("giving up webhook %s: %s", tried.webhook_id, outcome.error)
                dead.append(dead_entry(tried, outcome.error, now))
            else:
                s = self.settings
                delay = backoff_s(tried.attempts, s.retry_base_s, s.retry_max_s, self._rng)
                log.info(
                    "webhook %s failed (%s); retry in %.1f s",
                    tried.webhook_id,
                    outcome.error,
                    delay,
                )
                retries.append((tried, now + delay))
        self.schedule.settle(delivered, retries, dead)


def _delivery(event: JobEvent, job: Job | None, now: float) -> Delivery | None:
    """The webhook an event calls for, if its job (still) has somewhere to send it."""
    if job is None:
        return None  # the record expired (or is unreadable) before the event was read
    url = callback_for(job)
    if url is None:
        return None
    return Delivery(webhook_id(job.id, event.status or job.status), url, first=now)
