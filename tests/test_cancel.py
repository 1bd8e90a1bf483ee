"""Cancellation, deadlines and the TTL counted from a job's end, against a real redis-server and
a real worker process (TinyNet) that the loopback image server holds inside a message.

The worker serves one message at a time (``--concurrency 1``): while the held job of the first
message keeps it busy, the jobs of the messages behind it are queued, and whether the worker
ever fetched one shows in the image server's request counts.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from contract import defaults, keys
from contract.errors import AlreadyFinal, JobFailed, NotFound
from contract.job import ErrorInfo, Job
from contract.store import CancelOutcome, ClaimState, JobStore
from producer.client import Client
from tests.faults_support import (
    CHUNK,
    MODEL,
    ImageServer,
    held_layout,
    model_args_fixture,  # noqa: F401 (the model_args fixture, shared by the fault tests)
    producer_fixture,  # noqa: F401 (the producer fixture)
    server_fixture,  # noqa: F401 (the server fixture)
    settle,
    stuck_in_flight,
    wait_until,
)
from tests.support import job_events, write_images

# Seconds a finished record of these tests is kept: well under the queued record's TTL.
TTL_S = 300


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    return write_images(tmp_path / "images", 16, width=48, height=48)


def _held(
    producer: Client, server: ImageServer, images: list[Path], ttl_s: int | None = None
) -> list[Job]:
    """One message whose first job the server holds (it is then running), the rest local."""
    return producer.submit_many(held_layout(server, images, 1), model=MODEL, ttl_s=ttl_s)


def _events(client: redis.Redis) -> list[tuple[str, str]]:
    """(id, status) of every completion event, oldest first."""
    return [(job_id, status) for job_id, status, _ in job_events(client)]


def test_cancelled_jobs_behind_a_held_batch_never_run_and_a_running_ones_result_is_discarded(
    start_worker, model_args, server: ImageServer, images, producer: Client, redis_client
) -> None:
    start_worker(MODEL, *model_args, "--concurrency", "1")
    held = _held(producer, server, images, ttl_s=TTL_S)
    stuck_in_flight(server, producer, [j.id for j in held], 1)
    # Behind the held message: HTTP jobs the worker would fetch from the server if it ran them.
    behind = producer.submit_many([f"{server.base}/img/{n}" for n in range(5)], model=MODEL)
    last = producer.submit(str(images[0]), model=MODEL)  # queued after them: shows they passed

    outcomes = producer.cancel_many([j.id for j in behind] + [held[0].id, "never-submitted"])
    release_at = time.time()
    server.release()
    records = settle(producer, [j.id for j in held + behind] + [last.id])

    queued_ones = [CancelOutcome.CANCELLED] * len(behind)
    assert outcomes == [*queued_ones, CancelOutcome.CANCELLED_RUNNING, CancelOutcome.MISSING]
    assert server.arrived("img") == 0  # not one of the cancelled jobs was fetched
    by_id = {r.id: r for r in records if r is not None}
    assert len(by_id) == len(held) + len(behind) + 1
    for job in behind:
        got = by_id[job.id]
        assert (got.status, got.attempts, got.started, got.predictions) == (
            "cancelled",
            0,
            None,
            None,
        )
    running = by_id[held[0].id]
    # Its fetch was released only after the cancel: the result came and was thrown away.
    assert running.status == "cancelled" and running.predictions is None
    assert running.attempts == 1 and running.finished is not None
    assert running.finished <= release_at
    assert [by_id[j.id].status for j in held[1:]] == ["done"] * (CHUNK - 1)
    assert by_id[last.id].status == "done"
    # Every job counted once: done, cancelled (queued or running), and the discarded result.
    wait_until(lambda: producer.store.stats(MODEL).get("discarded") == 1, "the discarded result")
    assert producer.store.stats(MODEL) == {"done": CHUNK, "cancelled": 6, "discarded": 1}
    events = _events(redis_client)
    assert sorted(i for i, s in events if s == "cancelled") == sorted(
        [j.id for j in behind] + [held[0].id]
    )
    job_events = [e for e in events if e[0]]  # each submit_many's batch adds its own (no id)
    assert len(job_events) == len(by_id)  # one event per job, cancelled or done
    assert [s for i, s in events if not i] == ["batch_finished"] * 2
    # Kept for TTL_S from its end, not the 24 h a queued record gets.
    assert 0 < redis_client.ttl(keys.job_key(held[0].id)) <= TTL_S
    assert 0 < redis_client.ttl(keys.job_key(held[1].id)) <= TTL_S


def test_a_job_whose_deadline_passes_while_queued_expires_unfetched(
    start_worker, model_args, server: ImageServer, images, producer: Client, redis_client
) -> None:
    start_worker(MODEL, *model_args, "--concurrency", "1")
    held = _held(producer, server, images)
    stuck_in_flight(server, producer, [j.id for j in held], 1)
    deadline = time.time() + 1
    late = producer.submit_many(
        [f"{server.base}/img/{n}" for n in range(3)], model=MODEL, deadline=deadline, ttl_s=TTL_S
    )
    in_time = producer.submit(f"{server.base}/img/x", model=MODEL, deadline=time.time() + 3600)
    wait_until(lambda: time.time() > deadline + 0.1, "the deadline to pass")
    server.release()
    records = settle(producer, [j.id for j in held + late] + [in_time.id])

    assert all(r is not None for r in records)
    by_id = {r.id: r for r in records if r is not None}
    for job in late:
        got = by_id[job.id]
        assert (got.status, got.attempts, got.predictions) == ("expired", 0, None)
        assert got.deadline == pytest.approx(deadline, abs=1e-6)
        assert got.finished is not None and got.finished > deadline
        assert 0 < redis_client.ttl(keys.job_key(job.id)) <= TTL_S
    assert by_id[in_time.id].status == "done"
    assert server.arrived("img") == 1  # only the job that was in time was fetched
    stats = producer.store.stats(MODEL)
    assert stats == {"done": CHUNK + 1, "expired": len(late)}
    assert sorted(i for i, s in _events(redis_client) if s == "expired") == sorted(
        j.id for j in late
    )
    with pytest.raises(JobFailed) as failed:
        producer.result(late[0].id, timeout=0)
    assert failed.value.type == "expired"


def test_cancelling_a_final_job_is_refused_and_changes_nothing(
    start_worker, model_args, images, producer: Client, redis_client
) -> None:
    start_worker(MODEL, *model_args)
    job = producer.submit(str(images[0]), model=MODEL, top_k=3)
    done = producer.wait(job.id, 120)
    assert done is not None and done.status == "done"
    before = redis_client.get(keys.job_key(job.id))

    with pytest.raises(AlreadyFinal, match="already done"):
        producer.cancel(job.id)
    with pytest.raises(NotFound):
        producer.cancel("no-such-job")

    assert redis_client.get(keys.job_key(job.id)) == before
    assert producer.cancel_many([job.id]) == [CancelOutcome.ALREADY_FINAL]
    assert producer.store.stats(MODEL) == {"done": 1}
    assert _events(redis_client) == [(job.id, "done")]


def test_a_records_ttl_counts_from_its_end(redis_client: redis.Redis) -> None:
    """Queued: at least the queued TTL (24 h), whatever its own; final: its own, from then."""
    store = JobStore(redis_client)
    jobs = [
        Job(id=f"t{n}", uri="a.jpg", model="m", top_k=1, submitted=1.0, ttl_s=60) for n in range(4)
    ]
    store.create_many(jobs)
    assert all(redis_client.ttl(keys.job_key(j.id)) > 60 for j in jobs)
    assert redis_client.ttl(keys.job_key("t0")) <= defaults.QUEUED_TTL_S

    store.cancel_many(["t0"], 2.0)
    store.claim_many(["t1"], "m", 2.0, "w", fresh_only=True)
    (running,) = store.get_many(["t1"])
    assert running is not None
    store.finish_many([running.failed(ErrorInfo("not_found", "gone"), 3.0)])
    (poisoned,) = store.claim_many(["t3"], "m", 2.0, "w", fresh_only=False, max_attempts=0)

    assert 0 < redis_client.ttl(keys.job_key("t0")) <= 60
    assert 0 < redis_client.ttl(keys.job_key("t1")) <= 60
    assert redis_client.ttl(keys.job_key("t2")) > 60  # still queued
    assert poisoned.state == ClaimState.POISONED
    assert 0 < redis_client.ttl(keys.job_key("t3")) <= 60


def test_cancel_answers_each_id_and_counts_a_long_model_name_in_its_own_stats(
    redis_client: redis.Redis,
) -> None:
    store = JobStore(redis_client)
    model = "m" * 100  # stored in two pieces
    store.create_many([Job(id=i, uri="a.jpg", model=model, top_k=1, submitted=1.0) for i in "ab"])
    redis_client.set(keys.job_key("str"), "not a hash")
    redis_client.hset(keys.job_key("nostatus"), "u", "a.jpg")

    outcomes = store.cancel_many(["a", "a", "str", "nostatus", "none", "b"], 2.0)

    assert outcomes == [
        CancelOutcome.CANCELLED,
        CancelOutcome.ALREADY_FINAL,  # the same ID again: cancelled by the first
        CancelOutcome.CORRUPT,
        CancelOutcome.CORRUPT,
        CancelOutcome.MISSING,
        CancelOutcome.CANCELLED,
    ]
    assert store.stats(model) == {"cancelled": 2}
    assert redis_client.get(keys.job_key("str")) == b"not a hash"
    assert redis_client.hgetall(keys.job_key("nostatus")) == {b"u": b"a.jpg"}
    assert [(j.status, j.finished) for j in store.get_many(["a", "b"]) if j] == [
        ("cancelled", 2.0),
        ("cancelled", 2.0),
    ]
