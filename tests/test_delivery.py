"""At-least-once delivery with harmless duplicates, against real worker processes.

Workers die by SIGKILL (as the OOM killer does) with work in flight, stop by SIGTERM, or are
killed again and again by one job; every job still ends final exactly once.
"""

from __future__ import annotations

import signal
from dataclasses import replace
from pathlib import Path

import fakeredis
import pytest

from contract.job import Job, Prediction
from contract.store import JobStore
from producer.client import Client
from tests.faults_support import (
    CHUNK,
    MODEL,
    SETTLE_S,
    ImageServer,
    Supervisor,
    account,
    held_layout,
    model_args_fixture,  # noqa: F401 (the model_args fixture, shared by the fault tests)
    plain_jpeg,
    producer_fixture,  # noqa: F401 (the producer fixture, shared by the fault tests)
    server_fixture,  # noqa: F401 (the server fixture, shared by the fault tests)
    settle,
    statuses,
    stuck_in_flight,
    wait_until,
)
from tests.support import write_images
from worker.pipeline import EXIT_PIPELINE_DEAD

# Queue messages submitted, and how many one worker takes at once (its --concurrency).
_MESSAGES = 8
_CONCURRENCY = 4


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    return write_images(tmp_path / "images", 64, width=48, height=48)


@pytest.mark.slow
def test_a_worker_killed_mid_batch_loses_nothing_and_computes_nothing_twice(
    start_worker, model_args, producer: Client, server: ImageServer, images, redis_client
) -> None:
    first = start_worker(MODEL, *model_args, "--concurrency", str(_CONCURRENCY))
    ids = [j.id for j in producer.submit_many(held_layout(server, images, _MESSAGES), model=MODEL)]
    stuck_in_flight(server, producer, ids, _CONCURRENCY)
    assert statuses(producer, ids)["running"] == _CONCURRENCY

    first.kill()
    server.release()
    second = start_worker(MODEL, *model_args, "--concurrency", str(_CONCURRENCY))
    records = settle(producer, ids)

    tally = account("kill-9-mid-batch", redis_client, records)
    assert (tally.done, tally.failed, tally.lost) == (len(ids), 0, 0)
    assert (tally.executed_twice, tally.written_done) == (0, len(ids))
    # Only the jobs the dead worker held were started again; its finished ones were not.
    retried = [r for r in records if r.attempts > 1]
    assert [r.uri.split("/")[-2] for r in retried] == ["hold"] * _CONCURRENCY
    assert {r.attempts for r in retried} == {2}
    assert {r.worker for r in retried} == {second.worker_id}


@pytest.mark.slow
def test_sigterm_finishes_the_work_in_hand_requeues_the_rest_and_exits(
    start_worker, model_args, producer: Client, server: ImageServer, images, redis_client
) -> None:
    first = start_worker(MODEL, *model_args, "--concurrency", str(_CONCURRENCY))
    ids = [j.id for j in producer.submit_many(held_layout(server, images, _MESSAGES), model=MODEL)]
    stuck_in_flight(server, producer, ids, _CONCURRENCY)

    first.proc.send_signal(signal.SIGTERM)
    server.release()
    assert first.wait_exit(SETTLE_S) == 0, first.log()
    left = statuses(producer, ids)
    assert "running" not in left, left
    assert left["done"] >= _CONCURRENCY * CHUNK

    start_worker(MODEL, *model_args)
    tally = account("sigterm-in-flight", redis_client, settle(producer, ids))
    assert (tally.done, tally.failed, tally.lost) == (len(ids), 0, 0)
    assert (tally.executed_twice, tally.redelivered) == (0, 0)


@pytest.mark.slow
def test_a_job_that_kills_every_worker_fails_as_poison_after_max_attempts(
    start_worker, model_args, producer: Client, server: ImageServer, images, redis_client
) -> None:
    args = [*model_args, "--concurrency", "1", "--max-attempts", "3"]
    with Supervisor(lambda: start_worker(MODEL, *args, wait=False)) as supervisor:
        server.on_poison = supervisor.kill_current
        supervisor.current.wait_ready(SETTLE_S)
        uris = [str(images[n % len(images)]) for n in range(3 * CHUNK)]
        uris[CHUNK + 30] = f"{server.base}/poison/1"
        ids = [j.id for j in producer.submit_many(uris, model=MODEL)]
        records = settle(producer, ids)

    tally = account("poison-pill", redis_client, records)
    poison = records[CHUNK + 30]
    assert (poison.status, poison.error.type, poison.attempts) == ("failed", "poison", 3)
    assert supervisor.exit_codes == [-signal.SIGKILL] * 3
    assert server.arrived("poison") == 3
    assert (tally.done, tally.failed, tally.lost) == (len(ids) - 1, 1, 0)
    assert (tally.executed_twice, tally.written_done, tally.written_failed) == (0, len(ids) - 1, 1)
    assert max(r.attempts for r in records if r is not poison) <= 2


@pytest.mark.slow
def test_a_broken_device_sends_its_jobs_to_the_next_worker_instead_of_failing_them(
    start_worker, model_args, producer: Client, images, redis_client, tmp_path: Path
) -> None:
    black = tmp_path / "images" / "black.jpg"
    black.write_bytes(plain_jpeg((0, 0, 0)))  # breaks TinyNet's "device" for good
    args = [*model_args, "--concurrency", "1", "--max-attempts", "3", "--max-wait-ms", "1000"]
    with Supervisor(lambda: start_worker(MODEL, *args, wait=False)) as supervisor:
        supervisor.current.wait_ready(SETTLE_S)
        uris = [str(images[n % len(images)]) for n in range(2 * CHUNK)]
        uris[10] = str(black)
        ids = [j.id for j in producer.submit_many(uris, model=MODEL)]
        records = settle(producer, ids)

    tally = account("device-lost", redis_client, records)
    culprit = records[10]
    assert (culprit.status, culprit.error.type, culprit.attempts) == ("failed", "poison", 3)
    # Each time, the worker found its device broken, failed no job and exited.
    assert supervisor.exit_codes == [EXIT_PIPELINE_DEAD] * 3
    assert (tally.done, tally.failed, tally.lost) == (len(ids) - 1, 1, 0)
    assert tally.executed_twice == 0
    assert {r.attempts for r in records if r is not culprit} <= {1, 2}


@pytest.mark.slow
def test_a_message_redelivered_while_its_worker_still_runs_it_stores_one_result(
    start_worker, model_args, producer: Client, server: ImageServer, redis_client
) -> None:
    start_worker(MODEL, *model_args, "--concurrency", "2")
    job = producer.submit(f"{server.base}/hold/slow", model=MODEL)
    # Held past the visibility timeout, the message goes back on the queue and the same
    # worker's other thread takes it: two attempts of one job are now in flight.
    server.wait_arrivals("hold", 2)
    server.release()
    store = JobStore(redis_client)
    wait_until(lambda: sum(store.stats(MODEL).values()) >= 2, "both attempts to finish")

    tally = account("redelivered-while-running", redis_client, settle(producer, [job.id]))
    records = producer.get_many([job.id])
    assert (records[0].status, records[0].attempts) == ("done", 2)
    assert (tally.done, tally.executed_twice, tally.written_done) == (1, 1, 1)


def test_a_result_stored_by_an_earlier_attempt_keeps_the_later_attempt_count() -> None:
    store = JobStore(fakeredis.FakeRedis())
    store.create_many([Job(id="j", uri="a.jpg", model=MODEL, top_k=1, submitted=0.0)])
    first = store.claim_many(["j"], MODEL, 1.0, "w1", fresh_only=True)[0].job
    store.claim_many(["j"], MODEL, 2.0, "w2", fresh_only=False)
    done = first.done([Prediction("class1", 1, 0.5)], "weights", False, 3.0)

    assert store.finish_many([done]) == [True]
    assert store.get("j") == replace(done, attempts=2)
