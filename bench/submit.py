"""Bulk submission: how many jobs a second one producer process enqueues.

A model is registered with no worker behind it, so the queue only grows; the database is
flushed afterwards. It runs on its own database of the private Redis, away from the workers'.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from bench.e2e import submit
from contract.registry import ModelInfo, register_model
from producer.client import Client

# The registered model name no worker serves.
MODEL = "bench-no-worker"
# Database of the private Redis used for this stage; flushed when it ends.
DB = 15


@dataclass(frozen=True)
class SubmitRate:
    jobs: int
    seconds: float

    @property
    def jobs_s(self) -> float:
        return self.jobs / self.seconds


def submit_rate(redis_url: str, uri: str, jobs: int, top_k: int) -> SubmitRate:
    """Time ``submit_many`` (records, then Celery messages of CHUNK_SIZE IDs) for ``jobs``."""
    plain = redis.Redis.from_url(redis_url)
    register_model(plain, ModelInfo(MODEL, "none", True, 1000))
    client = Client.from_url(redis_url)
    try:
        started = time.perf_counter()
        submitted = submit(client, MODEL, [uri], jobs, top_k)
        seconds = time.perf_counter() - started
    finally:
        client.close()
        plain.flushdb()
        plain.close()
    return SubmitRate(len(submitted), seconds)
