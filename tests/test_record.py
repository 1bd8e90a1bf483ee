"""The stored form of a job (contract.record): small, read back whole by any process, and its
batched scripts keep the store's guarantees on a real redis-server."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from contract import defaults, keys, record
from contract.job import ErrorInfo, Job, Prediction, Priority
from contract.store import CLAIMED, POISONED, JobStore
from tests.support import RedisServer, job_events
from worker.resilience import is_transient

URI = "/data/images/2026-11-29/batch-0042/IMG_000123.jpg"  # 50 characters


def _job(job_id: str) -> Job:
    return Job(id=job_id, uri=URI, model="resnet50", top_k=5, submitted=1795673898.555123)


def _top5(job: Job, now: float) -> Job:
    predictions = [Prediction(f"class {i}", i * 97, p) for i, p in enumerate([0.4, 0.3, 0.2])]
    predictions += [Prediction("tabby, tabby cat", 281, 0.0123456), Prediction("x", 999, 1e-7)]
    return job.done(predictions, "torchscript:null-model.pt#f4e9b88c317d", False, now)


def _finish_one(store: JobStore, job_id: str) -> Job:
    store.create_many([_job(job_id)])
    (claim,) = store.claim_many([job_id], "resnet50", 1795673898.6, "gpu-7-4121", fresh_only=True)
    assert claim.state == CLAIMED and claim.job is not None
    done = _top5(claim.job, 1795673898.65)
    assert store.finish_many([done]) == [True]
    return done


def test_another_process_reads_the_record_whole_labels_and_names_included(
    redis_client: redis.Redis,
) -> None:
    redis_client.flushdb()
    done = _finish_one(JobStore(redis_client), "a" * 32)

    read = JobStore(redis_client).get("a" * 32)  # a fresh store knows no names or labels yet

    assert read == done
    assert read.worker == "gpu-7-4121" and read.weights == done.weights
    assert [p.label for p in read.predictions] == [p.label for p in done.predictions]


@pytest.mark.parametrize(
    "extra",
    [
        {},
        # The host path's: a 68-character path, a version, and a priority that is not normal.
        {"uri": f"/tmp/imgcls-hostpath/images/{'i' * 36}.jpg", "version": "86fbd1a5c6"},
    ],
)
def test_a_finished_top5_record_takes_at_most_300_bytes(
    redis_client: redis.Redis, extra: dict[str, str]
) -> None:
    redis_client.flushdb()
    store = JobStore(redis_client)
    job = replace(_job("b" * 32), priority=Priority.HIGH, **extra)
    store.create_many([job])
    (claim,) = store.claim_many([job.id], "resnet50", 1.8e9, "gpu-7-4121", fresh_only=True)
    assert claim.job is not None and claim.job.uri == job.uri
    done = _top5(claim.job, 1.8e9 + 1)
    assert store.finish_many([done]) == [True] and store.get(job.id) == done

    assert redis_client.memory_usage(keys.job_key(job.id), samples=0) <= 300


def test_probabilities_keep_the_float32_the_model_computed() -> None:
    predictions = [Prediction("a", 0, 0.123456789), Prediction("b", 70_000, 3.0e-9)]

    unpacked = record.unpack_predictions(record.pack_predictions(predictions))

    assert unpacked == [(0, 0.1234568), (70_000, 3.0e-9)]


def test_each_final_job_is_one_event_on_the_stream(redis_client: redis.Redis) -> None:
    redis_client.flushdb()
    store = JobStore(redis_client)
    store.create_many([_job(i) for i in ("done", "failed", "poison", "dup")])
    store.claim_many(["poison"], "resnet50", 1.8e9, "w", fresh_only=False, max_attempts=1)
    store.finish_many(
        [_top5(_job("done"), 1.8e9), _job("failed").failed(ErrorInfo("x", "y"), 1.8e9)]
    )
    store.finish_many([_job("done").failed(ErrorInfo("x", "late"), 1.8e9)])  # a duplicate

    (claim,) = store.claim_many(
        ["poison"], "resnet50", 1.8e9, "w", fresh_only=False, max_attempts=1
    )

    assert claim.state == POISONED
    assert job_events(redis_client) == [
        ("done", "done", ""),
        ("failed", "failed", ""),
        ("poison", "failed", ""),
    ]
    assert store.stats("resnet50") == {"done": 1, "failed": 2, "duplicate": 1}


# Every write of the store, on records "j1" (claimed once, by worker "w") and "j2" (queued).
WRITES = {
    "create": lambda store: store.create_many([_job("j3")]),
    "claim": lambda store: store.claim_many(["j1", "j2"], "resnet50", 1.8e9, "w", fresh_only=False),
    "finish": lambda store: store.finish_many([_top5(_job("j1"), 1.8e9), _top5(_job("j2"), 1.8e9)]),
}


def _two_jobs(client: redis.Redis) -> JobStore:
    """A store whose names and scripts are in Redis already, and the records of ``WRITES``."""
    client.flushdb()
    store = JobStore(client)
    store.create_many([_job("j0"), _job("j1"), _job("j2")])
    store.claim_many(["j1"], "resnet50", 1.8e9, "w", fresh_only=True)
    store.finish_many([_top5(_job("j0"), 1.8e9)])
    return store


def _records(client: redis.Redis) -> dict[bytes, bytes | None]:
    names = [keys.job_key(i) for i in ("j1", "j2", "j3")]
    return dict(zip(names, client.mget(names), strict=True))


@pytest.mark.parametrize("write", list(WRITES))
def test_a_write_refused_for_memory_raises_and_changes_nothing(
    redis_client: redis.Redis, write: str
) -> None:
    """Out of memory is a transient Redis error (the worker retries it), never a corrupt or
    missing record."""
    store = _two_jobs(redis_client)
    before = _records(redis_client)
    used = int(redis_client.info("memory")["used_memory"])
    redis_client.config_set("maxmemory", used - 1024)
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError) as raised:
            WRITES[write](store)
    finally:
        redis_client.config_set("maxmemory", 0)
    assert is_transient(raised.value)
    assert _records(redis_client) == before
    assert [j.attempts for j in store.get_many(["j1", "j2"])] == [1, 0]


@pytest.mark.parametrize("write", list(WRITES))
def test_a_write_to_a_read_only_replica_raises_readonly(
    redis_client: redis.Redis, tmp_path: Path, write: str
) -> None:
    """A replica (a primary demoted by a failover) refuses every write with READONLY, which the
    worker retries; reads still work."""
    _two_jobs(redis_client)
    redis_client.config_set("repl-diskless-sync-delay", 0)  # the replica syncs at once
    port = redis_client.connection_pool.connection_kwargs["port"]
    replica = RedisServer(tmp_path).start("--replicaof", "127.0.0.1", str(port))
    client = redis.Redis(port=replica.port)
    try:
        while client.info("replication")["master_link_status"] != "up":
            time.sleep(0.05)
        while client.get(keys.job_key("j2")) is None:
            time.sleep(0.05)
        store = JobStore(client)
        before = _records(client)
        with pytest.raises(redis.exceptions.ReadOnlyError) as raised:
            WRITES[write](store)
        assert is_transient(raised.value)
        assert _records(client) == before
        assert [j.attempts for j in store.get_many(["j1", "j2"])] == [1, 0]
    finally:
        client.close()
        replica.stop()


def test_names_and_labels_lost_by_redis_are_written_again(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis_client.flushdb()
    monkeypatch.setattr(defaults, "CATALOG_REWRITE_S", 0.0)
    store = JobStore(redis_client)
    _finish_one(store, "first")
    redis_client.delete(keys.names_key(), *redis_client.keys(keys.labels_key("*", 0)[:-1] + "*"))

    done = _finish_one(store, "second")

    assert JobStore(redis_client).get("second") == done


def test_a_reader_that_knows_the_names_fetches_only_the_labels(redis_client: redis.Redis) -> None:
    redis_client.flushdb()
    store, reader = JobStore(redis_client), JobStore(redis_client)
    first = _finish_one(store, "first")
    assert reader.get("first") == first  # the reader learns the names and these labels
    store.create_many([_job("second")])
    other = Prediction("a class no record had", 7, 1.0)
    second = replace(_top5(_job("second"), 1.8e9), predictions=(other,), worker=first.worker)
    store.finish_many([second])

    assert reader.get("second") == second


def test_waiting_reads_announced_records_once_all_together_at_the_end(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from producer.client import Client

    monkeypatch.setattr(defaults, "WAIT_RECHECK_S", 60.0)  # no quiet-second re-read here
    client = Client.from_url(redis_url)
    client.redis.flushdb()
    client.store.create_many([_job("w1"), _job("w2")])
    reads: list[list[str]] = []
    get_many = client.store.get_many
    client.store.get_many = lambda ids: reads.append(list(ids)) or get_many(ids)  # type: ignore[method-assign]
    worker = JobStore(client.redis)
    endings = [
        threading.Timer(delay, lambda i=i: worker.finish_many([_top5(_job(i), 1.8e9)]))
        for delay, i in ((0.2, "w1"), (0.4, "w2"))
    ]
    for ending in endings:
        ending.start()
    try:
        jobs = client.wait_many(["w1", "w2"], timeout=60)
    finally:
        for ending in endings:
            ending.join()
        client.close()

    assert [j.status for j in jobs if j is not None] == ["done", "done"]
    assert reads == [["w1", "w2"]]  # once each, after both were announced; before, none in full


def test_a_redis_that_forgot_the_scripts_still_creates_claims_and_finishes(
    redis_client: redis.Redis,
) -> None:
    redis_client.flushdb()
    store = JobStore(redis_client)
    redis_client.script_flush()  # a new or restarted Redis: the store calls scripts by SHA
    assert store.create_many([_job("f1")]) == [True]
    redis_client.script_flush()
    (claim,) = store.claim_many(["f1"], "m", 1.8e9, "w@h", fresh_only=True)
    assert claim.state == CLAIMED and claim.job is not None
    redis_client.script_flush()
    assert store.finish_many([_top5(claim.job, 1.8e9 + 1)]) == [True]
    assert store.finish_many([_top5(claim.job, 1.8e9 + 2)]) == [False]  # written once
    finished = store.get("f1")
    assert finished is not None and finished.status == "done" and finished.attempts == 1


@pytest.mark.parametrize("first_ends", ["done", "cancelled"])
def test_a_late_result_leaves_the_final_record_and_its_ttl_as_they_were(
    redis_client: redis.Redis, first_ends: str
) -> None:
    redis_client.flushdb()
    store = JobStore(redis_client)
    job = replace(_job("late"), ttl_s=5_000)
    store.create_many([job])
    if first_ends == "done":
        assert store.finish_many([_top5(job, time.time())]) == [True]
    else:
        store.cancel_many([job.id], time.time())
    key = keys.job_key(job.id)
    before, ttl_before = redis_client.get(key), redis_client.pttl(key)

    late = replace(job, ttl_s=90_000).failed(ErrorInfo("x", "late"), time.time())
    assert store.finish_many([late]) == [False]

    assert redis_client.get(key) == before
    assert abs(redis_client.pttl(key) - ttl_before) <= 1_000


def test_a_result_for_a_key_holding_no_record_leaves_the_value_to_expire_with_the_result(
    redis_client: redis.Redis,
) -> None:
    redis_client.flushdb()
    key = keys.job_key("stray")
    redis_client.set(key, b"not a record")  # no TTL: it would stay for good

    result = replace(_job("stray"), ttl_s=5_000).failed(ErrorInfo("x", "y"), time.time())
    assert JobStore(redis_client).finish_many([result]) == [False]

    assert redis_client.get(key) == b"not a record"
    assert 0 < redis_client.ttl(key) <= 5_000
