"""What each model's pool is doing: queue depth, oldest queued job, live workers, throughput.

Read from Redis only, so the same numbers serve ``python -m producer status`` and the gateway's
``/v1/models``; the Prometheus gauges that autoscaling follows are ``contract.gauges``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from contract import registry
from contract.gauges import oldest_queued_age
from contract.shards import ShardedStore


@dataclass(frozen=True)
class ModelStatus:
    """One model's pool at one instant; ``queued`` counts queue messages (each up to a chunk)."""

    model: str
    queued: int
    oldest_age_s: float | None
    workers: tuple[str, ...]
    done: int
    failed: int
    at: float
    # Jobs that ended without being run to the end: cancelled by a caller, or past their deadline.
    cancelled: int = 0
    expired: int = 0

    @property
    def finished(self) -> int:
        return self.done + self.failed


def model_status(
    client: redis.Redis, model: str, now: float, records: ShardedStore | None = None
) -> ModelStatus:
    """``records`` holds the job records and counters (default: on ``client``)."""
    records = records or ShardedStore([client])
    stats = records.stats(model)
    beats = registry.live_workers(client, model)
    return ModelStatus(
        model=model,
        queued=registry.queue_depth(client, model),
        oldest_age_s=oldest_queued_age(client, model, now, records),
        workers=tuple(sorted(str(b.get("worker", k)) for k, b in beats.items())),
        done=stats.get("done", 0),
        failed=stats.get("failed", 0),
        at=now,
        cancelled=stats.get("cancelled", 0),
        expired=stats.get("expired", 0),
    )


def snapshot(
    client: redis.Redis,
    models: Sequence[str] | None = None,
    clock: Callable[[], float] | None = None,
    records: ShardedStore | None = None,
) -> list[ModelStatus]:
    """Every registered model (or just ``models``), sorted by name; ``records`` holds the job
    records and counters where they are sharded (default: on ``client``)."""
    names = registry.known_models(client) if models is None else sorted(models)
    now = clock or time.time
    return [model_status(client, m, now(), records) for m in names]


def throughput(before: ModelStatus, after: ModelStatus) -> float:
    """Jobs finished (done or failed) per second between two samples of the same model."""
    seconds = after.at - before.at
    return 0.0 if seconds <= 0 else max(0, after.finished - before.finished) / seconds
