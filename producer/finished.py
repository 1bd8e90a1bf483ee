"""Long-polling without a subscription per request: one listener for the whole gateway.

Workers publish the IDs of jobs that reached a final state on ``keys.finished_channel()`` of
the Redis that holds the job (its shard: ``contract.shards``); a thread listens on every shard's
channel and wakes the requests waiting for those IDs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis

from contract import defaults, keys

log = logging.getLogger(__name__)

# Longest wait on one shard's channel before looking at the next, when listening to several.
SHARD_POLL_S = 0.02


class Announcements:
    """The finished-jobs channels of one or more Redis instances, read as one stream."""

    def __init__(self, clients: Sequence[redis.Redis]) -> None:
        self._pubsubs = [c.pubsub(ignore_subscribe_messages=True) for c in clients]

    def __enter__(self) -> Announcements:
        try:
            for pubsub in self._pubsubs:
                pubsub.subscribe(keys.finished_channel())
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for pubsub in self._pubsubs:
            pubsub.close()

    def get(self, timeout: float) -> list[str] | None:
        """The job IDs of the next announcement; None after ``timeout`` seconds without one."""
        if len(self._pubsubs) == 1:
            return _ids(self._pubsubs[0].get_message(timeout=timeout))
        deadline = time.monotonic() + timeout
        while True:
            for pubsub in self._pubsubs:
                left = max(0.0, deadline - time.monotonic())
                message = pubsub.get_message(timeout=min(SHARD_POLL_S, left))
                if message is not None:
                    return _ids(message)
            if time.monotonic() >= deadline:
                return None


def _ids(message: dict[str, Any] | None) -> list[str] | None:
    return None if message is None else [str(i) for i in json.loads(message["data"])]


class FinishedHub:
    """One subscription to the finished-jobs channels, fanned out to every waiting request.

    A thread blocks on the subscription and wakes the waiters' events on the event loop.
    """

    def __init__(self, clients: Sequence[redis.Redis], loop: asyncio.AbstractEventLoop) -> None:
        self.clients = clients
        self.loop = loop
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="finished-hub", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)

    @contextmanager
    def watch(self, job_id: str) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            waiting = self._waiters.get(job_id, set())
            waiting.discard(event)
            if not waiting:
                self._waiters.pop(job_id, None)

    def _wake(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            for event in self._waiters.get(job_id, ()):
                event.set()

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self._listen()
            except (redis.RedisError, OSError, ValueError) as e:
                log.warning("finished-jobs subscription lost (%s); resubscribing", e)
                self._stopped.wait(defaults.WAIT_RECHECK_S)

    def _listen(self) -> None:
        with Announcements(self.clients) as announcements:
            while not self._stopped.is_set():
                job_ids = announcements.get(timeout=defaults.WAIT_RECHECK_S)
                if job_ids is not None:
                    self.loop.call_soon_threadsafe(self._wake, job_ids)
