"""Completion events: every job that reaches a final state is appended, once, to the capped
stream ``keys.events_stream()``, which other services read with consumer groups."""

from __future__ import annotations

import time

import pytest
import redis

from contract import defaults, keys
from contract.events import EventGroup
from contract.job import DONE, ErrorInfo, Job, Prediction
from contract.store import JobStore

MODEL = "m"


def _jobs(store: JobStore, count: int) -> list[Job]:
    jobs = [Job(id=f"job-{n}", uri=f"/x/{n}.jpg", model=MODEL, top_k=1) for n in range(count)]
    store.create_many(jobs)
    return jobs


def _events(client: redis.Redis) -> list[dict[str, str]]:
    return [
        {keys.text(k): keys.text(v) for k, v in fields.items()}
        for _, fields in client.xrange(keys.events_stream())
    ]


def _done(job: Job) -> Job:
    return job.done([Prediction("a", 0, 1.0)], "w", False, time.time())


def test_each_finished_job_is_one_event_with_id_status_and_batch(
    redis_client: redis.Redis,
) -> None:
    store = JobStore(redis_client)
    ok, bad = _jobs(store, 2)
    store.finish_many([_done(ok), bad.failed(ErrorInfo("not_found", "gone"), time.time())])
    store.finish_many([_done(ok)])  # a redelivered result: stored once, announced once
    assert _events(redis_client) == [
        {"id": ok.id, "status": "done", "batch": ""},
        {"id": bad.id, "status": "failed", "batch": ""},
    ]


def test_a_job_failed_by_its_claim_is_an_event_too(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    (job,) = _jobs(store, 1)
    for _ in range(defaults.MAX_ATTEMPTS):
        store.claim_many([job.id], MODEL, time.time(), "w1", fresh_only=False)
    assert _events(redis_client) == []
    (poisoned,) = store.claim_many([job.id], MODEL, time.time(), "w2", fresh_only=False)
    assert poisoned.state == "poisoned"
    assert _events(redis_client) == [{"id": job.id, "status": "failed", "batch": ""}]


def test_the_stream_is_capped(redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(defaults, "EVENTS_MAX_LEN", 10)
    store = JobStore(redis_client)
    jobs = _jobs(store, 1000)
    store.finish_many([_done(j) for j in jobs])
    # MAXLEN ~ trims whole radix-tree nodes (100 entries by default), never below the cap.
    assert 10 <= redis_client.xlen(keys.events_stream()) <= 10 + 100
    assert _events(redis_client)[-1] == {"id": jobs[-1].id, "status": DONE.value, "batch": ""}


def test_one_event_a_dead_consumer_left_pending_is_taken_over(redis_client: redis.Redis) -> None:
    """A single abandoned event (redis-py answers XAUTOCLAIM's IDs as a plain list)."""
    dead = EventGroup(redis_client, "readers", "dead", claim_idle_s=0)
    dead.setup()
    redis_client.xadd(keys.events_stream(), {"id": "j1", "status": "done", "batch": ""})
    assert len(dead.read(">", 10, None)) == 1  # read, never acknowledged
    heir = EventGroup(redis_client, "readers", "heir", claim_idle_s=0)
    assert heir.claim_abandoned(10)
    assert [fields[b"id"] for _, fields in heir.read("0", 10, None)] == [b"j1"]
    assert (
        redis_client.xpending_range(keys.events_stream(), "readers", "-", "+", 10)[0]["consumer"]
        == b"heir"
    )
