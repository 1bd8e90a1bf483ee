"""Pending webhook deliveries, kept in Redis so that a restarted sender loses none.

A sorted set holds each delivery's webhook ID, scored by when it is next due; a hash holds its
URL, first try and attempts. A sender leases the due ones (pushing their score past the lease),
so a sender that dies mid-POST leaves them due again once the lease runs out.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import redis

from contract import defaults, keys

# KEYS[1] due set. ARGV: now, lease end, most to take. Leases the deliveries due by now.
_LEASE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, member in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], member) end
return due
"""


@dataclass(frozen=True)
class Delivery:
    """One webhook to send: its ID (stable across retries), where to, and how it went so far."""

    webhook_id: str
    url: str
    first: float
    attempts: int = 0

    @property
    def job_id(self) -> str:
        return self.webhook_id.rpartition(":")[0]

    @property
    def batch(self) -> str | None:
        """The batch whose finish this webhook announces; None for a job's webhook."""
        subject = self.job_id
        return subject.removesuffix(_BATCH) if subject.endswith(_BATCH) else None

    def encode(self) -> str:
        return json.dumps({"url": self.url, "first": self.first, "attempts": self.attempts})

    @classmethod
    def decode(cls, webhook_id: str, raw: bytes | str) -> Delivery:
        data = json.loads(raw)
        return cls(webhook_id, data["url"], float(data["first"]), int(data["attempts"]))


def webhook_id(job_id: str, status: str) -> str:
    """The ``webhook-id`` of a job's final record: the same on every retry."""
    return f"{job_id}:{status}"


# What follows a batch's ID in its webhook's ID: no job ID contains "/".
_BATCH = "/batch"


def batch_webhook_id(batch: str) -> str:
    """The ``webhook-id`` of a batch's finish: ``<batch>/batch:finished``."""
    return webhook_id(f"{batch}{_BATCH}", "finished")


def backoff_s(attempts: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: base, 2 x base, 4 x base ... up to max, each x 0.5..1."""
    delay: float = min(max_s, base_s * 2 ** min(attempts - 1, 60))
    return delay * rng.uniform(0.5, 1.0)


class Schedule:
    """Reads and writes the pending deliveries; every change is one transaction."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._lease = client.register_script(_LEASE)

    def add(self, pipe: redis.client.Pipeline, delivery: Delivery) -> None:
        """Queue ``delivery`` as due now, in ``pipe``; one already pending is left as it is."""
        pipe.hsetnx(keys.webhook_state_key(), delivery.webhook_id, delivery.encode())
        pipe.zadd(keys.webhook_due_key(), {delivery.webhook_id: delivery.first}, nx=True)

    def lease(self, now: float, lease_s: float, count: int) -> list[Delivery]:
        """Up to ``count`` due deliveries, hidden from other senders for ``lease_s`` seconds."""
        args = [now, now + lease_s, count]
        ids = [keys.text(i) for i in self._lease(keys=[keys.webhook_due_key()], args=args)]
        if not ids:
            return []
        raws = self.redis.hmget(keys.webhook_state_key(), ids)
        orphans = [i for i, raw in zip(ids, raws, strict=True) if raw is None]
        if orphans:  # no state (written by hand?): nothing to send
            self.redis.zrem(keys.webhook_due_key(), *orphans)
        return [Delivery.decode(i, raw) for i, raw in zip(ids, raws, strict=True) if raw]

    def next_due(self) -> float | None:
        """When the earliest pending delivery is due, or None when there is none."""
        first = self.redis.zrange(keys.webhook_due_key(), 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    def settle(
        self,
        delivered: Sequence[Delivery],
        retries: Sequence[tuple[Delivery, float]],
        dead: Sequence[dict[str, object]],
    ) -> None:
        """Drop the delivered, reschedule the retries (delivery, due), record the given up."""
        pipe = self.redis.pipeline(transaction=True)
        done = [d.webhook_id for d in delivered] + [str(d["webhook_id"]) for d in dead]
        if done:
            pipe.zrem(keys.webhook_due_key(), *done)
            pipe.hdel(keys.webhook_state_key(), *done)
        for delivery, due in retries:
            pipe.hset(keys.webhook_state_key(), delivery.webhook_id, delivery.encode())
            pipe.zadd(keys.webhook_due_key(), {delivery.webhook_id: due})
        if dead:
            pipe.lpush(keys.webhook_dead_key(), *(json.dumps(d) for d in dead))
            pipe.ltrim(keys.webhook_dead_key(), 0, defaults.WEBHOOK_DEAD_MAX_ENTRIES - 1)
        pipe.execute()


def dead_entry(delivery: Delivery, error: str, now: float) -> dict[str, object]:
    """What the dead list keeps about a delivery given up on."""
    return {**asdict(delivery), "job_id": delivery.job_id, "error": error, "given_up": now}


def read_dead(client: redis.Redis, limit: int | None = None) -> list[dict[str, object]]:
    """The given-up deliveries, newest first."""
    end = -1 if limit is None else limit - 1
    return [json.loads(raw) for raw in client.lrange(keys.webhook_dead_key(), 0, end)]
