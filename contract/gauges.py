"""The queue gauges autoscaling follows: depth and the oldest queued job's age, per model.

Read from Redis only, at scrape time, so the gateway and every worker export the same numbers.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator

import redis
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from contract import registry
from contract.errors import MalformedRecord
from contract.shards import ShardedStore

log = logging.getLogger(__name__)


def oldest_queued_age(
    client: redis.Redis, model: str, now: float, records: ShardedStore | None = None
) -> float | None:
    """Seconds since the oldest job waiting in any of ``model``'s queues (every version and
    priority) was submitted; None when they are all empty. Records are read from ``records``
    (where they are sharded; default: ``client``)."""
    store = records or ShardedStore([client])
    ages = [_head_age(client, q, now, store) for q in registry.queues(client, model)]
    return max((a for a in ages if a is not None), default=None)


def _head_age(client: redis.Redis, queue: str, now: float, records: ShardedStore) -> float | None:
    """Celery LPUSHes and workers BRPOP, so the oldest message sits at the list's tail."""
    raw = client.lindex(queue, -1)
    if raw is None:
        return None
    job_id = _first_job_id(raw)
    if job_id is None:
        return None
    try:
        job = records.get(job_id)
    except MalformedRecord:
        return None
    submitted = None if job is None else job.submitted
    return None if submitted is None else max(0.0, now - submitted)


def _first_job_id(raw: bytes | str) -> str | None:
    """The first job ID of a Celery (protocol 2) message: body is ``[args, kwargs, embed]``."""
    try:
        message = json.loads(raw)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        first = json.loads(body)[0][0][0]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        log.warning("cannot read the head message of a queue: %s", e)
        return None
    return first if isinstance(first, str) else None


class QueueCollector(Collector):
    """Queue depth and oldest queued job's age per model, read from Redis at scrape time.

    These two gauges are the autoscaling signal; a scrape that cannot reach Redis yields no
    samples rather than stale ones.
    """

    def __init__(
        self,
        client: redis.Redis,
        models: Callable[[], Iterable[str]],
        records: ShardedStore | None = None,
    ) -> None:
        self.client = client
        self.models = models
        self.records = records

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "imgcls_queue_depth", "Messages waiting in the model's queues.", labels=["model"]
        )
        age = GaugeMetricFamily(
            "imgcls_queue_oldest_age_seconds",
            "Seconds since the oldest queued job was submitted (0 when the queue is empty).",
            labels=["model"],
        )
        try:
            now = time.time()
            for model in self.models():
                depth.add_metric([model], registry.queue_depth(self.client, model))
                oldest = oldest_queued_age(self.client, model, now, self.records)
                age.add_metric([model], oldest or 0.0)
        except redis.RedisError as e:
            log.warning("queue metrics unavailable: %s", e)
            return
        yield depth
        yield age

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Describing by collecting would hit Redis at registration time.
        return iter(())
