"""Batches: every submission can name one (several jobs get one generated); its counters move in
the same Lua call that finishes each job; its results are read from a cursor, in the order the
jobs became final, every job once."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from contract import keys
from contract.errors import AlreadyFinal, IdConflict, InvalidRequest, NotFound
from contract.job import ErrorInfo, Job, Prediction
from contract.shards import ShardedStore
from contract.store import JobStore
from producer.client import Client, SubmitRequest
from tests.support import ROOT, RedisServer, job_events
from tests.support_gateway import register_idle_model

MODEL = "batchnet"
# A batch's counts: one per final status.
NONE = {"done": 0, "failed": 0, "cancelled": 0, "expired": 0}


@pytest.fixture
def client(redis_url: str) -> Iterator[Client]:
    register_idle_model(redis_url, MODEL)
    c = Client.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def sharded(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    """A client whose records spread over this test's Redis and a second one."""
    register_idle_model(redis_url, MODEL)
    other = RedisServer(tmp_path_factory.mktemp("shard2"))
    other.start()
    client = Client.from_url(redis_url, [redis_url, other.url])
    yield client
    client.close()
    other.stop()


def finish(store: ShardedStore, job_ids: list[str], fail: frozenset[str] = frozenset()) -> None:
    """What a worker does: claim the jobs, then store each result (failed for ``fail``)."""
    now = time.time()
    for job_id in job_ids:
        (claim,) = store.claim_many([job_id], MODEL, now, "w1", fresh_only=False)
        assert claim.job is not None
        job = claim.job
        if job_id in fail:
            store.finish_many([job.failed(ErrorInfo("not_found", "gone"), now)])
        else:
            store.finish_many([job.done([Prediction("a", 0, 1.0)], "w", False, now)])


def test_many_jobs_get_one_generated_batch_one_job_none(client: Client) -> None:
    jobs = client.submit_many([f"/x/{i}.jpg" for i in range(5)], model=MODEL)
    assert len({j.batch for j in jobs}) == 1 and jobs[0].batch is not None
    assert client.get(jobs[0].id) == jobs[0]  # the record carries it
    assert client.submit("/x/one.jpg", model=MODEL).batch is None
    named = client.submit("/x/one.jpg", model=MODEL, batch="mine")
    assert named.batch == "mine"
    batch = client.batch(jobs[0].batch)
    assert batch is not None
    assert (batch.total, batch.pending, batch.progress, batch.finished) == (5, 5, 0.0, None)
    assert batch.counts == NONE
    assert batch.created is not None and abs(batch.created - time.time()) < 60


def test_counts_progress_and_finished_follow_each_final_job(client: Client) -> None:
    jobs = client.submit_many([f"/x/{i}.jpg" for i in range(10)], model=MODEL, batch="b1")
    ids = [j.id for j in jobs]
    finish(client.store, ids[:4], fail=frozenset({ids[1]}))
    finish(client.store, ids[:4])  # a redelivered result counts once
    batch = client.batch("b1")
    assert batch is not None
    assert (batch.total, batch.pending, batch.progress) == (10, 6, 0.4)
    assert batch.counts == {**NONE, "done": 3, "failed": 1}
    assert batch.finished is None
    finish(client.store, ids[4:])
    batch = client.batch("b1")
    assert batch is not None and batch.finished is not None
    assert (batch.pending, batch.progress, batch.counts) == (
        0,
        1.0,
        {**NONE, "done": 9, "failed": 1},
    )


def test_a_later_submission_to_a_finished_batch_reopens_it(client: Client) -> None:
    first = client.submit_many(["/x/a.jpg", "/x/b.jpg"], model=MODEL, batch="grow")
    finish(client.store, [j.id for j in first])
    assert client.batch("grow").is_finished  # type: ignore[union-attr]
    more = client.submit("/x/c.jpg", model=MODEL, batch="grow")
    batch = client.batch("grow")
    assert batch is not None and not batch.is_finished and batch.total == 3
    finish(client.store, [more.id])
    assert client.batch("grow").is_finished  # type: ignore[union-attr]


def test_a_resubmitted_id_is_not_counted_twice(client: Client) -> None:
    requests = [SubmitRequest("/x/a.jpg", "same-a"), SubmitRequest("/x/b.jpg", "same-b")]
    client.submit_many(requests, model=MODEL, batch="twice")
    again = client.submit_many(requests, model=MODEL, batch="twice")
    assert [j.batch for j in again] == ["twice", "twice"]
    assert client.batch("twice").total == 2  # type: ignore[union-attr]
    listed = [i for page in client.store.batch_job_ids("twice") for i in page]
    assert listed == ["same-a", "same-b"]  # taken out again: listed once


def test_results_come_from_a_cursor_in_finish_order_each_once(client: Client) -> None:
    jobs = client.submit_many([f"/x/{i}.jpg" for i in range(25)], model=MODEL, batch="res")
    ids = [j.id for j in jobs]
    order = ids[::-1]
    finish(client.store, order[:7], fail=frozenset({order[3]}))
    page = client.batch_results("res", limit=5)
    assert [i for i, _ in page.records] == order[:5] and not page.complete
    page = client.batch_results("res", page.cursor, limit=5)
    assert [i for i, _ in page.records] == order[5:7] and not page.complete
    assert page.records[-1][1] is not None and page.records[-1][1].status == "done"
    cursor = page.cursor
    finish(client.store, order[7:])
    seen: list[str] = []
    while True:
        page = client.batch_results("res", cursor, limit=4)
        seen += [i for i, job in page.records if job is not None and job.is_final]
        cursor = page.cursor
        if page.complete:
            break
    assert seen == order[7:]
    assert client.batch_results("res", cursor).records == []


def test_results_of_unknown_batches_and_foreign_cursors_are_refused(client: Client) -> None:
    with pytest.raises(NotFound):
        client.batch_results("nobody")
    assert client.batch("nobody") is None
    client.submit_many(["/x/a.jpg", "/x/b.jpg"], model=MODEL, batch="cur")
    for cursor in ("0.0", "x", "-1"):
        with pytest.raises(InvalidRequest):
            client.batch_results("cur", cursor)
    with pytest.raises(InvalidRequest):
        client.submit_many(["/x/a.jpg"], model=MODEL, batch="../etc")
    with pytest.raises(InvalidRequest):
        client.submit_many(["/x/a.jpg"], model=MODEL, output="http://example.com/x")


def test_the_batch_travels_in_the_events_stream_and_finishing_adds_one_event(
    client: Client, redis_client: redis.Redis
) -> None:
    jobs = client.submit_many(["/x/a.jpg", "/x/b.jpg"], model=MODEL, batch="ev")
    finish(client.store, [j.id for j in jobs], fail=frozenset({jobs[1].id}))
    assert job_events(redis_client) == [
        (jobs[0].id, "done", "ev"),
        (jobs[1].id, "failed", "ev"),
        ("", "batch_finished", "ev"),  # the batch's own, once, after its jobs'
    ]


def test_a_poisoned_job_counts_in_its_batch(client: Client) -> None:
    (job,) = client.submit_many(["/x/a.jpg"], model=MODEL, batch="poison")
    for _ in range(4):
        client.store.claim_many([job.id], MODEL, time.time(), "w", fresh_only=False)
    batch = client.batch("poison")
    assert batch is not None and batch.counts["failed"] == 1 and batch.is_finished
    page = client.batch_results("poison")
    assert page.complete and [i for i, _ in page.records] == [job.id]


def test_batch_keys_live_as_long_as_their_records(
    client: Client, redis_client: redis.Redis
) -> None:
    jobs = client.submit_many(["/x/a.jpg", "/x/b.jpg"], model=MODEL, batch="ttl", ttl_s=100)
    names = (keys.batch_key("ttl"), keys.batch_jobs_key("ttl"), keys.batch_results_key("ttl"))
    finish(client.store, [jobs[0].id])
    queued = redis_client.ttl(keys.job_key(jobs[1].id))
    assert queued > 100  # a queued record lives longer than a final one
    assert all(redis_client.ttl(name) >= queued for name in names)
    finish(client.store, [jobs[1].id])
    assert all(0 < redis_client.ttl(name) <= 100 for name in names[::2])  # the job list is gone
    assert not redis_client.exists(names[1])


def test_a_batch_over_two_shards_sums_them_and_reads_every_result(sharded: Client) -> None:
    client = sharded
    jobs = client.submit_many([f"/x/{i}.jpg" for i in range(40)], model=MODEL, batch="wide")
    assert all(client.store.shards[i].batch_hash("wide") for i in (0, 1))
    finish(client.store, [j.id for j in jobs])
    batch = client.batch("wide")
    assert batch is not None and batch.total == 40 and batch.is_finished
    ids: list[str] = []
    cursor = None
    while True:
        page = client.batch_results("wide", cursor, limit=7)
        ids += [i for i, _ in page.records]
        cursor = page.cursor
        if page.complete:
            break
    assert Counter(ids) == Counter(j.id for j in jobs)
    assert cursor.count(".") == 1


def _producer(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producer", *args, "--redis-url", redis_url],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )


def test_the_cli_submits_a_batch_and_reads_its_status_and_results(
    client: Client, redis_url: str
) -> None:
    run = _producer(redis_url, "submit", "--model", MODEL, "--batch", "cli", "/x/a.jpg", "/x/b.jpg")
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["batch"] for r in records] == ["cli", "cli"]
    ids = [r["id"] for r in records]
    status = _producer(redis_url, "batch", "status", "cli")
    assert status.returncode == 5 and json.loads(status.stdout)["pending"] == 2
    finish(client.store, ids[:1])
    results = _producer(redis_url, "batch", "results", "cli")
    assert results.returncode == 5
    assert [json.loads(line)["id"] for line in results.stdout.splitlines()] == ids[:1]
    cursor = results.stderr.split()[-1]
    finish(client.store, ids[1:])
    rest = _producer(redis_url, "batch", "results", "cli", "--cursor", cursor)
    assert rest.returncode == 0, rest.stderr
    assert [json.loads(line)["id"] for line in rest.stdout.splitlines()] == ids[1:]
    status = _producer(redis_url, "batch", "status", "cli")
    assert status.returncode == 0 and json.loads(status.stdout)["counts"]["done"] == 2
    unknown = _producer(redis_url, "batch", "status", "nobody")
    assert unknown.returncode == 1 and "not_found" in unknown.stderr


def test_a_finished_batch_drops_its_job_list_and_a_reopened_one_lists_only_the_new_jobs(
    client: Client, redis_client: redis.Redis
) -> None:
    jobs = client.submit_many(["/x/a.jpg", "/x/b.jpg"], model=MODEL)
    batch = jobs[0].batch or ""
    assert len(batch) == 16
    listed = [i for page in client.store.batch_job_ids(batch) for i in page]
    assert listed == [j.id for j in jobs]
    finish(client.store, [j.id for j in jobs])
    assert not redis_client.exists(keys.batch_jobs_key(batch))
    more = client.submit("/x/c.jpg", model=MODEL, batch=batch)
    assert [i for page in client.store.batch_job_ids(batch) for i in page] == [more.id]


def test_cancelling_a_batch_ends_every_unfinished_job_and_only_those(
    client: Client, redis_client: redis.Redis
) -> None:
    jobs = client.submit_many([f"/x/{i}.jpg" for i in range(10)], model=MODEL, batch="stop")
    ids = [j.id for j in jobs]
    finish(client.store, ids[:3], fail=frozenset({ids[0]}))
    (running,) = client.store.claim_many([ids[3]], MODEL, time.time(), "w2", fresh_only=True)
    assert running.job is not None
    cancelled, batch = client.cancel_batch("stop")
    assert cancelled == 7  # 6 queued, 1 running
    assert batch.counts == {**NONE, "done": 2, "failed": 1, "cancelled": 7}
    assert batch.pending == 0 and batch.is_finished
    records = client.get_many(ids)
    assert [r.status if r else None for r in records] == ["failed"] + ["done"] * 2 + [
        "cancelled"
    ] * 7
    late = running.job.done([Prediction("a", 0, 1.0)], "w", False, time.time())
    assert client.store.finish_many([late]) == [False]  # the running job's result: discarded
    assert client.batch("stop") == batch
    page = client.batch_results("stop")
    assert page.complete and sorted(i for i, _ in page.records) == sorted(ids)
    events = [status for _, status, _ in job_events(redis_client)]
    assert events.count("cancelled") == 7 and events.count("batch_finished") == 1
    with pytest.raises(AlreadyFinal):
        client.cancel_batch("stop")
    with pytest.raises(NotFound):
        client.cancel_batch("nobody")


def test_producer_batch_cancel(client: Client, redis_url: str) -> None:
    client.submit_many(["/x/a.jpg", "/x/b.jpg"], model=MODEL, batch="clistop")
    run = _producer(redis_url, "batch", "cancel", "clistop")
    assert run.returncode == 0, run.stderr
    reply = json.loads(run.stdout)
    assert reply["cancelled"] == 2 and reply["batch"]["counts"]["cancelled"] == 2
    again = _producer(redis_url, "batch", "cancel", "clistop")
    assert again.returncode == 1 and "already_final" in again.stderr


def _finished_events(redis_client: redis.Redis, batch: str) -> int:
    return job_events(redis_client).count(("", "batch_finished", batch))


def test_a_submission_in_several_writes_finishes_its_batch_only_at_its_end(
    client: Client, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("producer.client._WRITE_BATCH", 3)  # 7 jobs: writes of 3, 3 and 1
    writes = client.iter_submit_batches(
        [f"/x/{i}.jpg" for i in range(7)], model=MODEL, batch="long"
    )
    for _ in range(3):  # each write's jobs all final before the next is written
        finish(client.store, [j.id for j in next(writes)])
        batch = client.batch("long")
        assert batch is not None and not batch.is_finished and batch.pending == 0
    assert _finished_events(redis_client, "long") == 0
    with pytest.raises(StopIteration):  # the submission ends: the batch may finish, and does
        next(writes)
    batch = client.batch("long")
    assert batch is not None and batch.is_finished and batch.total == 7
    assert _finished_events(redis_client, "long") == 1


def test_a_submission_stopped_midway_lets_its_batch_finish_with_what_it_queued(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("producer.client._WRITE_BATCH", 2)
    writes = client.iter_submit_batches([f"/x/{i}.jpg" for i in range(6)], model=MODEL, batch="cut")
    queued = next(writes)
    writes.close()  # the caller stops (Ctrl-C) after the first write
    finish(client.store, [j.id for j in queued])
    batch = client.batch("cut")
    assert batch is not None and batch.is_finished and batch.total == 2


def test_a_batch_kept_open_finishes_only_once_closed(
    client: Client, redis_client: redis.Redis
) -> None:
    first = client.submit_many(["/x/a.jpg", "/x/b.jpg"], model=MODEL, batch="kept", keep_open=True)
    finish(client.store, [j.id for j in first])
    second = client.submit_many(["/x/c.jpg"], model=MODEL, batch="kept", keep_open=True)
    finish(client.store, [j.id for j in second])
    batch = client.batch("kept")
    assert batch is not None and not batch.is_finished and batch.total == 3
    closed = client.close_batch("kept")  # every job final: it finishes now
    assert closed.is_finished and closed.counts["done"] == 3
    assert client.close_batch("kept") == closed  # again: nothing changes
    assert _finished_events(redis_client, "kept") == 1
    with pytest.raises(NotFound):
        client.close_batch("nobody")


def test_a_closed_batch_with_jobs_pending_finishes_with_its_last_job(client: Client) -> None:
    jobs = client.submit_many(["/x/a.jpg", "/x/b.jpg"], model=MODEL, batch="later", keep_open=True)
    assert not client.close_batch("later").is_finished
    finish(client.store, [jobs[0].id])
    assert not client.batch("later").is_finished  # type: ignore[union-attr]
    finish(client.store, [jobs[1].id])
    assert client.batch("later").is_finished  # type: ignore[union-attr]


def test_cancelling_a_batch_held_open_ends_it(client: Client) -> None:
    jobs = client.submit_many(["/x/a.jpg", "/x/b.jpg"], model=MODEL, batch="held", keep_open=True)
    finish(client.store, [j.id for j in jobs])
    cancelled, batch = client.cancel_batch("held")
    assert cancelled == 0 and batch.is_finished and batch.counts["done"] == 2


def test_a_batch_kept_open_over_two_shards_finishes_on_both_once_closed(sharded: Client) -> None:
    client = sharded
    jobs = client.submit_many(
        [f"/x/{i}.jpg" for i in range(20)], model=MODEL, batch="wideopen", keep_open=True
    )
    assert all(client.store.shards[i].batch_hash("wideopen") for i in (0, 1))
    finish(client.store, [j.id for j in jobs])
    assert not client.batch("wideopen").is_finished  # type: ignore[union-attr]
    closed = client.close_batch("wideopen")
    assert closed.is_finished and closed.total == 20
    assert all("finished" in client.store.shards[i].batch_hash("wideopen") for i in (0, 1))


def test_producer_batch_close(client: Client, redis_url: str) -> None:
    jobs = client.submit_many(["/x/a.jpg"], model=MODEL, batch="cliclose", keep_open=True)
    finish(client.store, [j.id for j in jobs])
    run = _producer(redis_url, "batch", "close", "cliclose")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["finished"] is not None
    unknown = _producer(redis_url, "batch", "close", "nobody")
    assert unknown.returncode == 1 and "not_found" in unknown.stderr


def test_a_batch_finishes_when_its_last_job_ended_before_a_resubmitted_id_left_it(
    client: Client, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    client.submit_many([SubmitRequest("/x/a.jpg", "race-a")], model=MODEL)  # exists, no batch
    real = JobStore._leave_batches

    def worker_first(store: JobStore, jobs: list[Job], *rest: Any) -> None:
        # the new job ends while the taken ID still counts in the total (2): not finished yet
        listed = [i for page in client.store.batch_job_ids("race") for i in page]
        finish(client.store, [i for i in listed if i != "race-a"])
        assert not client.batch("race").is_finished  # type: ignore[union-attr]
        real(store, jobs, *rest)

    monkeypatch.setattr(JobStore, "_leave_batches", worker_first)
    requests = [SubmitRequest("/x/a.jpg", "race-a"), "/x/b.jpg"]
    client.submit_many(requests, model=MODEL, batch="race")
    batch = client.batch("race")
    assert batch is not None and batch.total == 1 and batch.is_finished
    assert _finished_events(redis_client, "race") == 1


def test_a_finished_batch_joined_again_by_existing_ids_only_stays_finished_once(
    client: Client, redis_client: redis.Redis
) -> None:
    requests = [SubmitRequest("/x/a.jpg", "again-a"), SubmitRequest("/x/b.jpg", "again-b")]
    jobs = client.submit_many(requests, model=MODEL, batch="again")
    finish(client.store, [j.id for j in jobs])
    before = client.batch("again")
    assert before is not None and before.is_finished
    client.submit_many(requests, model=MODEL, batch="again")  # a client's retry
    assert client.batch("again") == before  # the same finish time, no second event
    assert _finished_events(redis_client, "again") == 1


def test_a_batch_held_by_two_submissions_finishes_after_both_end(
    client: Client, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("producer.client._WRITE_BATCH", 2)
    a = client.iter_submit_batches([f"/a/{i}.jpg" for i in range(4)], model=MODEL, batch="two")
    b = client.iter_submit_batches([f"/b/{i}.jpg" for i in range(4)], model=MODEL, batch="two")
    for writes in (a, b, a, b):
        finish(client.store, [j.id for j in next(writes)])
    assert next(a, None) is None  # a ends: b still holds the batch
    assert not client.batch("two").is_finished  # type: ignore[union-attr]
    taken = next(iter(client.store.batch_job_ids("two")))[0]
    with pytest.raises(IdConflict):  # a third, refused before its first write, releases its own
        client.submit_many(
            [SubmitRequest("/c.jpg", taken)] + [SubmitRequest(f"/c/{i}.jpg") for i in range(3)],
            model=MODEL,
            batch="two",
        )
    assert client.batch("two").total == 8  # type: ignore[union-attr]
    assert not client.batch("two").is_finished  # type: ignore[union-attr]
    assert next(b, None) is None
    batch = client.batch("two")
    assert batch is not None and batch.is_finished and batch.total == 8
    assert _finished_events(redis_client, "two") == 1


def test_a_streamed_submission_over_two_shards_finishes_only_at_its_end(
    sharded: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("producer.client._WRITE_BATCH", 5)
    client = sharded
    uris = [f"/x/{i}.jpg" for i in range(20)]
    writes = client.iter_submit_batches(uris, model=MODEL, batch="streamwide")
    for jobs in writes:
        finish(client.store, [j.id for j in jobs])
        assert not client.batch("streamwide").is_finished  # type: ignore[union-attr]
    batch = client.batch("streamwide")
    assert batch is not None and batch.is_finished and batch.total == 20


def test_producer_batch_close_with_jobs_pending_exits_5(client: Client, redis_url: str) -> None:
    client.submit_many(["/x/a.jpg"], model=MODEL, batch="clipending", keep_open=True)
    run = _producer(redis_url, "batch", "close", "clipending")
    assert run.returncode == 5, run.stderr
    assert json.loads(run.stdout)["pending"] == 1
