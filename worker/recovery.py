"""Recovery in seconds: the messages of a worker whose heartbeat expired go back to the queue.

Kombu's Redis transport keeps each delivered, unacknowledged message in the hash ``unacked``
and its delivery time in the sorted set ``unacked_index``; every worker's consumer puts back
those older than the visibility timeout (300 s by default). That timeout must outlast the
slowest message, so it cannot be short. A heartbeat can: so each worker also records the
delivery tags it holds in its *held set*, named in the set of held sets (a sweep reads that
set, never the keyspace), and every live worker looks for held sets whose owner's heartbeat is
gone. Their entries in ``unacked_index`` get score 0 (``ZADD XX``: only
tags still unacknowledged), so the next sweep of kombu's own restore (every
``unacked_restore_interval``) puts them back on their queues, once. A job that was in flight is
then retried alone by the claim script, its attempt counted; nothing is stored twice.

An owner counts as dead only when its heartbeat is missing at two sweeps in a row, and the
script checks it again atomically, so a Redis that comes back from an outage before the
workers have beaten again does not hand live workers' messages around.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from celery import Celery
from celery.signals import task_received
from kombu.transport.redis import Channel

from contract import keys

log = logging.getLogger(__name__)

# Kombu's sorted set of unacknowledged delivery tags, scored by delivery time.
UNACKED_INDEX = Channel.unacked_index_key

# KEYS: heartbeat, held set, unacked index, the set of held sets. ARGV[1]: "1" to skip the
# heartbeat check (a worker reclaiming what its own previous incarnation held). Returns the
# tags made due.
_REAP = """
if ARGV[1] ~= '1' and redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local due = 0
for _, tag in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  due = due + redis.call('ZADD', KEYS[3], 'XX', 'CH', 0, tag)
end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[4], KEYS[2])
return due
"""

# KEYS: own held set, unacked index. ARGV[1]: TTL. Forgets tags acked or restored since.
_PRUNE = """
for _, tag in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if not redis.call('ZSCORE', KEYS[2], tag) then redis.call('SREM', KEYS[1], tag) end
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
"""


class Reaper(threading.Thread):
    """Records what this worker holds; returns dead workers' messages to their queues."""

    def __init__(
        self,
        client: redis.Redis,
        app: Celery,
        model: str,
        worker_id: str,
        interval_s: float,
        held_ttl_s: int,
    ) -> None:
        super().__init__(name="reaper", daemon=True)
        self.client = client
        self.app = app
        self.model = model
        self.worker_id = worker_id
        self.interval_s = interval_s
        self.held_ttl_s = held_ttl_s
        self.held = keys.held_key(model, worker_id)
        self.stopped = threading.Event()
        self._suspects: set[str] = set()
        self._reap = client.register_script(_REAP)
        self._prune = client.register_script(_PRUNE)

    def start(self) -> None:
        """Reclaim what a previous process with this worker ID held, then start recording."""
        try:
            self._reap_one(self.held, force=True)
        except redis.RedisError as e:
            log.warning("could not reclaim this worker ID's earlier messages: %s", e)
        task_received.connect(self._on_received, weak=False)
        super().start()

    def stop(self, timeout: float = 10) -> None:
        task_received.disconnect(self._on_received)
        self.stopped.set()
        if self.is_alive():
            self.join(timeout)

    def _on_received(self, sender: Any = None, request: Any = None, **_: object) -> None:
        if getattr(sender, "app", None) is not self.app or request is None:
            return
        try:
            record_held(self.client, self.held, request.message.delivery_tag)
        except redis.RedisError as e:  # the message then waits for the visibility timeout
            log.warning("could not record a held message: %s", e)

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                self.sweep()
            except redis.RedisError as e:
                log.warning("recovery sweep failed: %s", e)

    def sweep(self) -> int:
        """One round: forget acked tags of our own, reap owners missing twice. Returns tags due."""
        self._prune(keys=[self.held, UNACKED_INDEX], args=[self.held_ttl_s])
        missing = {h for h in self._held_sets() if h != self.held and not self._alive(h)}
        confirmed, self._suspects = missing & self._suspects, missing - self._suspects
        return sum(self._reap_one(h) for h in confirmed)

    def _held_sets(self) -> list[str]:
        return [keys.text(k) for k in self.client.smembers(keys.held_sets_key())]

    def _alive(self, held: str) -> bool:
        return bool(self.client.exists(keys.heartbeat_key(*keys.held_owner(held))))

    def _reap_one(self, held: str, force: bool = False) -> int:
        heartbeat = keys.heartbeat_key(*keys.held_owner(held))
        names = [heartbeat, held, UNACKED_INDEX, keys.held_sets_key()]
        due = int(self._reap(keys=names, args=["1" if force else "0"]))
        if due > 0:
            log.warning("%d messages of worker %s go back to the queue", due, held)
        return max(due, 0)


def record_held(client: redis.Redis, held: str, tag: str) -> None:
    """Add a delivery tag to the held set ``held``, and name that set where sweeps look."""
    pipe = client.pipeline(transaction=False)
    pipe.sadd(held, tag)
    pipe.sadd(keys.held_sets_key(), held)
    pipe.execute()
