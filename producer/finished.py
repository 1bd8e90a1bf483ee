"""Long-polling without a subscription per request: one listener for the whole gateway.

Workers publish the IDs of jobs that reached a final state on ``keys.finished_channel()``; a
thread blocks on that channel and wakes the requests waiting for those IDs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from contract import defaults, keys

log = logging.getLogger(__name__)


class FinishedHub:
    """One subscription to the finished-jobs channel, fanned out to every waiting request.

    A thread blocks on the subscription and wakes the waiters' events on the event loop.
    """

    def __init__(self, client: redis.Redis, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
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
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(keys.finished_channel())
            while not self._stopped.is_set():
                message = pubsub.get_message(timeout=defaults.WAIT_RECHECK_S)
                if message is not None:
                    self.loop.call_soon_threadsafe(self._wake, json.loads(message["data"]))
        finally:
            pubsub.close()
