"""Job records over several Redis instances: routing by job ID, and one job stream over two
real redis-servers (the second reached through a sentinel) with a real worker."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from contract import keys, registry
from contract.job import Job, Prediction, new_job_id
from contract.shards import ShardedStore, parse_urls, shard_of
from producer import cli as producer_cli
from producer import status
from producer.client import Client, SubmitRequest
from tests.faults_support import MODEL, SETTLE_S, Workers, tiny_model_args, wait_until
from tests.support import ROOT, RedisServer, write_images
from tests.support_sentinel import SERVICE, SentinelProcess
from worker.cli import _settings as worker_settings
from worker.cli import main

JOBS = 1000


def test_a_job_id_goes_to_the_same_shard_in_every_process() -> None:
    ids = [f"job-{i}" for i in range(200)]
    here = [shard_of(i, 3) for i in ids]
    script = (
        "from contract.shards import shard_of; print([shard_of(f'job-{i}', 3) for i in range(200)])"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    there = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert there.strip() == str(here)
    assert set(here) == {0, 1, 2}


def test_one_shard_holds_everything() -> None:
    assert {shard_of(new_job_id(), 1) for _ in range(50)} == {0}


def test_store_urls_come_from_repeated_options_and_commas() -> None:
    assert parse_urls(["redis://a:1/0,redis://b:2/0", " redis://c:3/0 "]) == (
        "redis://a:1/0",
        "redis://b:2/0",
        "redis://c:3/0",
    )
    with pytest.raises(ValueError, match="twice"):
        parse_urls(["redis://a:1/0", "redis://a:1/0"])


@pytest.fixture
def two_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    for name in ("broker", "second"):
        (tmp_path / name).mkdir()
    servers = [RedisServer(tmp_path / name).start() for name in ("broker", "second")]
    yield servers[0], servers[1]
    for server in servers:
        server.stop()


def _job(job_id: str) -> Job:
    return Job(id=job_id, uri="/x.jpg", model=MODEL, top_k=1, submitted=time.time())


def test_the_sharded_store_keeps_input_order_and_each_record_on_its_shard(
    two_redis: tuple[RedisServer, RedisServer],
) -> None:
    clients = [redis.Redis.from_url(s.url) for s in two_redis]
    store = ShardedStore(clients)
    ids = [new_job_id() for _ in range(100)]
    assert store.create_many([_job(i) for i in ids]) == [True] * 100
    assert store.create_many([_job(ids[0]), _job("fresh")]) == [False, True]
    for job_id in ids:
        on = [bool(c.exists(keys.job_key(job_id))) for c in clients]
        assert on == [i == shard_of(job_id, 2) for i in range(2)]

    shuffled = random.sample(ids, len(ids))
    assert [j.id for j in store.get_many([*shuffled, "nope"]) if j] == shuffled
    claims = store.claim_many(shuffled, MODEL, time.time(), "w1", fresh_only=True)
    assert [(c.job_id, str(c.state)) for c in claims] == [(i, "claimed") for i in shuffled]
    running = [c.job for c in claims if c.job is not None]
    finals = [j.done([Prediction("a", 0, 1.0)], "w", False, time.time()) for j in running]
    again = finals[:10]
    assert store.finish_many([*finals, *again]) == [True] * 100 + [False] * 10
    assert store.get_many(shuffled) == [store.get(i) for i in shuffled]
    assert all(j is not None and j.status == "done" for j in store.get_many(shuffled))
    assert store.stats(MODEL) == {"done": 100, "duplicate": 10}
    per_shard = [s.stats(MODEL).get("done", 0) for s in store.shards]
    assert sum(per_shard) == 100 and all(per_shard)
    store.close()


def test_status_reads_the_oldest_job_and_the_counters_from_the_shards(
    two_redis: tuple[RedisServer, RedisServer],
) -> None:
    broker, second = two_redis
    producer = Client.from_url(broker.url, store_urls=[broker.url, second.url])
    try:
        registry.declare_model(producer.redis, MODEL, 10)
        on_second = [i for i in (f"id-{n}" for n in range(100)) if shard_of(i, 2) == 1]
        producer.submit_many([SubmitRequest("/x.jpg", i) for i in on_second[:3]], model=MODEL)
        producer.store.shards[1].redis.hincrby(keys.stats_key(MODEL), "done", 5)
        producer.store.shards[0].redis.hincrby(keys.stats_key(MODEL), "done", 2)
        (state,) = status.snapshot(producer.redis, [MODEL], records=producer.store)
    finally:
        producer.close()
    assert state.oldest_age_s is not None and state.done == 7


@pytest.fixture
def sentinel(two_redis: tuple[RedisServer, RedisServer], tmp_path: Path) -> Iterator[str]:
    """A sentinel watching the second Redis: the URL that shard is reached by."""
    (tmp_path / "sentinel").mkdir()
    process = SentinelProcess(tmp_path / "sentinel", two_redis[1].port).start()
    try:
        wait_until(lambda: process.primary_port() == two_redis[1].port, "the sentinel", 30)
        yield f"redis+sentinel://127.0.0.1:{process.port}/{SERVICE}"
    finally:
        process.stop()


def test_two_redis_instances_carry_one_job_stream_with_every_job_done_and_stored_once(
    two_redis: tuple[RedisServer, RedisServer], sentinel: str, tmp_path: Path, torch_home: str
) -> None:
    broker, second = two_redis
    stores = [broker.url, sentinel]
    images = write_images(tmp_path / "images", 16, width=48, height=48)
    args = [*tiny_model_args(tmp_path / "model"), "--allowed-root", str(images[0].parent)]
    with Workers(broker.url, tmp_path, torch_home, args) as workers:
        workers.start(*(a for url in stores for a in ("--store-url", url)))
        producer = Client.from_url(broker.url, store_urls=stores)
        try:
            uris = [str(images[i % len(images)]) for i in range(JOBS)]
            ids = [j.id for j in producer.submit_many(uris, model=MODEL)]
            records = producer.wait_many(ids, SETTLE_S)
            stats = producer.store.stats(MODEL)
        finally:
            producer.close()

    assert [r.id if r else None for r in records] == ids
    assert all(r is not None and r.status == "done" and r.attempts == 1 for r in records)
    assert stats == {"done": JOBS}  # no duplicate result, nothing failed
    on_broker, on_second = (_job_ids(redis.Redis.from_url(s.url)) for s in two_redis)
    assert on_broker.isdisjoint(on_second) and on_broker | on_second == set(ids)
    assert min(len(on_broker), len(on_second)) > JOBS // 4  # each a fair share
    # The queues and bookkeeping live on the broker only; beside the records: their completion
    # events, the names and labels they refer to, and their finished batch's share on this
    # shard (its job list dropped once it finished).
    labels = keys.labels_key(MODEL, 0).rsplit(":", 1)[0]
    beside = {n for n in _queue_keys(second) if not n.startswith(labels)}
    batch = records[0].batch if records[0] else ""
    batch_keys = {keys.batch_key(batch), keys.batch_results_key(batch)}
    assert beside == {keys.events_stream(), keys.names_key(), *batch_keys}


def _job_ids(client: redis.Redis) -> set[str]:
    prefix = keys.job_key("")
    found = {keys.text(k)[len(prefix) :] for k in client.scan_iter(match=keys.job_key("*"))}
    client.close()
    return found


def _queue_keys(server: RedisServer) -> set[str]:
    """Keys on ``server`` that are not job records or job counters."""
    client = redis.Redis.from_url(server.url)
    try:
        names = {keys.text(k) for k in client.scan_iter()}
    finally:
        client.close()
    return {n for n in names if not n.startswith((keys.job_key(""), keys.stats_key("")))}


def test_the_worker_takes_its_store_urls_from_flags_or_the_environment(monkeypatch) -> None:
    flags = ["--model", "m", "--store-url", "redis://a:1/0", "--store-url", "redis://b:2/0"]
    assert worker_settings(main.make_context("worker", flags).params).store_urls == (
        "redis://a:1/0",
        "redis://b:2/0",
    )
    monkeypatch.setenv("IMGCLS_STORE_URLS", "redis://a:1/0,redis://b:2/0")
    from_env = worker_settings(main.make_context("worker", ["--model", "m"]).params)
    assert from_env.store_urls == ("redis://a:1/0", "redis://b:2/0")


def test_the_producer_cli_reads_a_record_from_the_shard_in_its_environment(
    two_redis: tuple[RedisServer, RedisServer],
) -> None:
    broker, second = two_redis
    job_id = next(i for i in (f"id-{n}" for n in range(100)) if shard_of(i, 2) == 1)
    store = ShardedStore([redis.Redis.from_url(s.url) for s in two_redis])
    store.create_many([_job(job_id)])
    store.close()
    env = {"IMGCLS_STORE_URLS": f"{broker.url},{second.url}"}
    args = ["result", "--redis-url", broker.url, job_id]
    sharded = CliRunner().invoke(producer_cli.main, args, env=env)
    alone = CliRunner().invoke(producer_cli.main, args)
    found, missing = json.loads(sharded.output), json.loads(alone.output)
    assert (found["id"], found["status"]) == (job_id, "queued")
    assert sharded.exit_code == 5  # still queued: unfinished
    assert (missing["status"], missing["error"]["type"]) == (None, "not_found")
    assert alone.exit_code == 1
