"""Completion events: every job that reaches a final state is appended, once, to the capped
stream ``keys.events_stream()``, which other services read with consumer groups; an entry holds
the jobs one store call ended with one status."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import redis

from contract import defaults, keys
from contract.events import EventGroup, JobEvent
from contract.job import DONE, ErrorInfo, Job, Prediction
from contract.store import JobStore
from tests.support import job_events

MODEL = "m"


def _jobs(store: JobStore, count: int) -> list[Job]:
    jobs = [Job(id=f"job-{n}", uri=f"/x/{n}.jpg", model=MODEL, top_k=1) for n in range(count)]
    store.create_many(jobs)
    return jobs


def _entries(client: redis.Redis) -> list[dict[str, str]]:
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
    assert job_events(redis_client) == [(ok.id, "done", ""), (bad.id, "failed", "")]


def test_one_store_call_is_one_entry_per_status_and_batch(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    first, bad, third = _jobs(store, 3)
    batched = [replace(j, id=f"b-{j.id}", batch="b1") for j in (first, third)]
    store.create_many(batched)
    failed = bad.failed(ErrorInfo("not_found", "gone"), time.time())
    store.finish_many([_done(first), failed, _done(third), *map(_done, batched)])
    assert _entries(redis_client) == [
        {"ids": f"{first.id} {third.id}", "status": "done", "batch": ""},
        {"ids": bad.id, "status": "failed", "batch": ""},
        {"ids": "b-job-0 b-job-2", "status": "done", "batch": "b1"},
        {"ids": "", "status": "batch_finished", "batch": "b1"},
    ]


def test_a_job_failed_by_its_claim_is_an_event_too(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    (job,) = _jobs(store, 1)
    for _ in range(defaults.MAX_ATTEMPTS):
        store.claim_many([job.id], MODEL, time.time(), "w1", fresh_only=False)
    assert job_events(redis_client) == []
    (poisoned,) = store.claim_many([job.id], MODEL, time.time(), "w2", fresh_only=False)
    assert poisoned.state == "poisoned"
    assert job_events(redis_client) == [(job.id, "failed", "")]


def test_the_stream_is_capped(redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    # An entry of four "job-NNN" IDs is about 67 bytes by the scripts' reckoning: ten of them.
    monkeypatch.setattr(defaults, "EVENTS_MAX_BYTES", 670)
    store = JobStore(redis_client)
    jobs = _jobs(store, 1000)
    for at in range(0, len(jobs), 4):  # 250 calls, an entry each
        store.finish_many([_done(j) for j in jobs[at : at + 4]])
    # MAXLEN ~ trims whole radix-tree nodes (100 entries by default), never below the cap.
    assert 10 <= redis_client.xlen(keys.events_stream()) <= 10 + 100
    assert job_events(redis_client)[-1] == (jobs[-1].id, DONE.value, "")


def test_an_entry_of_the_form_before_one_job_an_entry_is_still_read() -> None:
    old = {b"id": b"j1", b"status": b"done", b"batch": b"b"}
    assert JobEvent.of(old) == [JobEvent("j1", "done", "b")]
    assert JobEvent.of(None) == []  # trimmed while pending: nothing to handle


def test_a_pending_entry_trimmed_away_is_read_without_fields_and_logged(
    redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    reader = EventGroup(redis_client, "readers", "r1", claim_idle_s=60)
    reader.setup()
    redis_client.xadd(keys.events_stream(), {"ids": "j1", "status": "done", "batch": ""})
    assert len(reader.read(">", 10, None)) == 1  # read, not acknowledged yet
    redis_client.xtrim(keys.events_stream(), maxlen=0, approximate=False)
    with caplog.at_level("WARNING", logger="contract.events"):
        ((_, fields),) = reader.read("0", 10, None)
    assert JobEvent.of(fields) == []
    assert "1 pending events entries were trimmed" in caplog.text


def test_one_cancel_call_is_one_entry(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    jobs = _jobs(store, 3)
    store.cancel_many([j.id for j in jobs], time.time())
    assert _entries(redis_client) == [
        {"ids": " ".join(j.id for j in jobs), "status": "cancelled", "batch": ""}
    ]


def test_one_event_a_dead_consumer_left_pending_is_taken_over(redis_client: redis.Redis) -> None:
    """A single abandoned event (redis-py answers XAUTOCLAIM's IDs as a plain list)."""
    dead = EventGroup(redis_client, "readers", "dead", claim_idle_s=0)
    dead.setup()
    redis_client.xadd(keys.events_stream(), {"ids": "j1", "status": "done", "batch": ""})
    assert len(dead.read(">", 10, None)) == 1  # read, never acknowledged
    heir = EventGroup(redis_client, "readers", "heir", claim_idle_s=0)
    assert heir.claim_abandoned(10)
    assert [fields[b"ids"] for _, fields in heir.read("0", 10, None)] == [b"j1"]
    assert (
        redis_client.xpending_range(keys.events_stream(), "readers", "-", "+", 10)[0]["consumer"]
        == b"heir"
    )
