"""Broker faults and a soak, against a real redis-server and real worker processes.

Redis is killed and restarted (with AOF) or drops every connection while work is in flight;
workers and the producer ride it out, and every job still ends final exactly once.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from contract import keys, registry
from contract.job import DONE, Job, new_job_id
from contract.messaging import TASK_NAME
from producer.client import Client
from tests.faults_support import (
    MODEL,
    SETTLE_S,
    ImageServer,
    Workers,
    account,
    held_layout,
    model_args_fixture,  # noqa: F401 (the model_args fixture, shared by the fault tests)
    outcome,
    server_fixture,  # noqa: F401 (the server fixture, shared by the fault tests)
    settle,
    stuck_in_flight,
    wait_until,
)
from tests.support import RedisServer, write_images

_MESSAGES = 8
_CONCURRENCY = 4


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    return write_images(tmp_path / "images", 200, width=48, height=48)


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server with AOF on (fsync on every write), restartable on its port."""
    workdir = tmp_path / "aof"
    workdir.mkdir()
    server = RedisServer(workdir, appendonly=True)
    server.start()
    yield server
    server.stop()


def _submit(producer: Client, uris: list[str]) -> list[str]:
    return [j.id for j in producer.submit_many(uris, model=MODEL)]


@pytest.mark.slow
def test_a_redis_restart_with_aof_mid_run_loses_no_job(
    aof_redis: RedisServer, model_args, server: ImageServer, images, tmp_path, torch_home
) -> None:
    producer = Client.from_url(aof_redis.url)
    with Workers(aof_redis.url, tmp_path, torch_home, model_args) as workers:
        workers.start("--concurrency", str(_CONCURRENCY))
        ids = _submit(producer, held_layout(server, images, _MESSAGES))
        stuck_in_flight(server, producer, ids, _CONCURRENCY)

        aof_redis.stop(kill=True)  # SIGKILL: only what the AOF holds survives
        server.release()  # the held jobs finish while Redis is down and wait to be stored
        aof_redis.start()
        ids += _submit(producer, [str(p) for p in images])  # the same producer, reconnected
        records = settle(producer, ids)

    client = redis.Redis.from_url(aof_redis.url)
    tally = account("redis-restart-aof", client, records)
    assert (tally.done, tally.failed, tally.lost) == (len(ids), 0, 0)
    assert tally.written_done == len(ids)
    producer.close()
    client.close()


@pytest.mark.slow
def test_dropped_connections_mid_run_lose_no_job(
    start_worker, model_args, server: ImageServer, images, redis_url, redis_client
) -> None:
    producer = Client.from_url(redis_url)
    start_worker(MODEL, *model_args, "--concurrency", str(_CONCURRENCY))
    ids = _submit(producer, held_layout(server, images, _MESSAGES))
    stuck_in_flight(server, producer, ids, _CONCURRENCY)

    for kind in ("normal", "pubsub"):
        redis_client.client_kill_filter(_type=kind, skipme=True)
    server.release()
    ids += _submit(producer, [str(p) for p in images])
    records = settle(producer, ids)

    tally = account("dropped-connections", redis_client, records)
    assert (tally.done, tally.failed, tally.lost) == (len(ids), 0, 0)
    assert tally.written_done == len(ids)
    producer.close()


def _refused_for_memory(client: redis.Redis) -> int:
    return int(client.info("errorstats").get("errorstat_OOM", {}).get("count", 0))


@pytest.mark.slow
def test_results_refused_by_a_full_redis_wait_for_memory_instead_of_being_dropped(
    start_worker, model_args, server: ImageServer, images, redis_url, redis_client
) -> None:
    producer = Client.from_url(redis_url)
    start_worker(MODEL, *model_args, "--concurrency", str(_CONCURRENCY))
    ids = _submit(producer, held_layout(server, images, _MESSAGES))
    stuck_in_flight(server, producer, ids, _CONCURRENCY)

    redis_client.config_resetstat()
    redis_client.config_set("maxmemory", 1)  # every write that needs memory is refused
    try:
        server.release()
        # A heartbeat is refused every few seconds; the held results, several times a second.
        wait_until(lambda: _refused_for_memory(redis_client) >= 3, "results refused")
    finally:
        redis_client.config_set("maxmemory", 0)
    records = settle(producer, ids)

    tally = account("redis-out-of-memory", redis_client, records)
    assert (tally.done, tally.failed, tally.lost) == (len(ids), 0, 0)
    producer.close()


def _bad_inputs(root: Path, outside: Path) -> list[tuple[str, str]]:
    """25 of each kind of bad input: (uri, the error type its job must fail with)."""
    (root / "text.jpg").write_text("not an image at all")
    photo = (root / "img00000.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(photo[: len(photo) // 2])
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(photo)
    kinds = [
        (str(root / "missing-{n}.jpg"), "not_found"),
        (str(root / "text.jpg"), "not_an_image"),
        (str(root / "cut.jpg"), "not_an_image"),
        (str(outside / "secret.jpg"), "access_denied"),
        (str(root / ".." / outside.name / "secret.jpg"), "access_denied"),
    ]
    return [(uri.format(n=n), error) for n in range(20) for uri, error in kinds]


@pytest.mark.slow
def test_a_soak_of_ten_thousand_jobs_with_one_percent_bad_accounts_for_every_one(
    start_worker, model_args, images, tmp_path, redis_url, redis_client
) -> None:
    bad = _bad_inputs(images[0].parent, tmp_path / "outside")
    uris = [(str(images[n % len(images)]), "done") for n in range(10_000 - len(bad))] + bad
    random.Random(4).shuffle(uris)
    # A visibility timeout far above any message's run time: this test is about accounting.
    start_worker(MODEL, *model_args, "--visibility-timeout", "120")
    producer = Client.from_url(redis_url)
    records = settle(producer, _submit(producer, [u for u, _ in uris]), timeout=240)

    tally = account("soak-10k-1pct-bad", redis_client, records)
    assert [outcome(r) for r in records] == [expected for _, expected in uris]
    assert (tally.done, tally.failed, tally.lost) == (10_000 - len(bad), len(bad), 0)
    assert (tally.written_done, tally.written_failed) == (tally.done, tally.failed)
    producer.close()


def _queue(client: redis.Redis) -> str:
    """The normal-priority queue of the version the running worker serves."""
    info = registry.get_model(client, MODEL)
    assert info is not None
    return keys.queue_name(MODEL, info.version)


def _redeliveries_behind_holds(
    producer: Client, server: ImageServer, images: list[Path]
) -> tuple[list[str], list[str]]:
    """One message per worker thread: a held HTTP job, then 75 jobs a dead worker had started
    (``attempts`` 1), which the worker claims one at a time only once the held job is over."""
    held, again = [], []
    for m in range(_CONCURRENCY):
        first = Job(id=new_job_id(), uri=f"{server.base}/hold/{m}", model=MODEL, top_k=5)
        rest = [
            Job(id=new_job_id(), uri=str(images[n % len(images)]), model=MODEL, top_k=5, attempts=1)
            for n in range(75)
        ]
        producer.store.create_many([first, *rest])
        ids = [first.id] + [j.id for j in rest]
        queue = _queue(producer.redis)
        producer.celery.send_task(TASK_NAME, args=[ids], queue=queue, routing_key=queue)
        held.append(first.id)
        again += [j.id for j in rest]
    return held, again


def _refused_scripts(client: redis.Redis) -> int:
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("failed_calls", 0)) + int(stats.get("rejected_calls", 0))


@pytest.mark.slow
def test_claims_refused_by_a_full_redis_are_retried_not_read_as_corrupt_records(
    start_worker, model_args, server: ImageServer, images, redis_url, redis_client
) -> None:
    """The existing OOM test fills Redis while results wait to be stored, so no claim runs
    then. Here every thread is inside a message whose remaining jobs it claims only after its
    held job ends, and that job's record is gone, so ending it needs no memory: each of those
    claims meets the full Redis."""
    producer = Client.from_url(redis_url)
    # A visibility timeout far above the test's length: no message may come round again.
    start_worker(
        MODEL, *model_args, "--concurrency", str(_CONCURRENCY), "--visibility-timeout", "300"
    )
    held, ids = _redeliveries_behind_holds(producer, server, images)
    server.wait_arrivals("hold", _CONCURRENCY)

    redis_client.delete(*map(keys.job_key, held))
    redis_client.config_resetstat()
    used = int(redis_client.info("memory")["used_memory"])
    redis_client.config_set("maxmemory", used - 1024)  # every write that needs memory is refused
    try:
        server.release()
        wait_until(lambda: _refused_scripts(redis_client) >= 20, "claims refused")
    finally:
        redis_client.config_set("maxmemory", 0)
    records = settle(producer, ids)

    tally = account("redis-out-of-memory-claims", redis_client, records)
    assert (tally.done, tally.failed, tally.lost) == (len(ids), 0, 0)
    assert redis_client.lrange(keys.dead_letter_key(), 0, -1) == []
    producer.close()


def _rejected(client: redis.Redis, command: str) -> int:
    return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("rejected_calls", 0))


@pytest.mark.slow
def test_messages_popped_while_redis_is_full_wait_for_memory_instead_of_being_lost(
    start_worker, model_args, images, redis_url, redis_client
) -> None:
    """kombu records a popped message as unacked before the task runs: with Redis full, that
    write is refused just after the message left the queue."""
    producer = Client.from_url(redis_url)
    start_worker(MODEL, *model_args, "--concurrency", str(_CONCURRENCY))
    # One job done first: the worker's consumer is then bound to its queue and popping, so the
    # writes refused below are the bookkeeping of popped messages, not the consumer's start-up
    # (whose refusal makes Celery retry the connection with a backoff longer than the wait).
    warm = producer.submit(str(images[-1]), model=MODEL)
    assert (done := producer.wait(warm.id, SETTLE_S)) is not None and done.status == DONE
    staging = keys.queue_name("staging", "v")  # a queue no worker takes, moved over below
    jobs = [Job(id=new_job_id(), uri=str(p), model=MODEL, top_k=5) for p in images[:128]]
    producer.store.create_many(jobs)
    for start in range(0, len(jobs), 32):
        ids = [j.id for j in jobs[start : start + 32]]
        producer.celery.send_task(TASK_NAME, args=[ids], queue=staging, routing_key=staging)

    redis_client.config_resetstat()
    # Every write that needs memory is refused: a limit just under what is used let the
    # bookkeeping through once client buffers freed more than the margin on a loaded machine.
    redis_client.config_set("maxmemory", 1)
    try:
        redis_client.rename(staging, _queue(redis_client))  # RENAME needs no memory
        wait_until(lambda: _rejected(redis_client, "zadd") >= 3, "unacked bookkeeping refused")
    finally:
        redis_client.config_set("maxmemory", 0)
    records = settle(producer, [j.id for j in jobs])

    tally = account("redis-out-of-memory-pop", redis_client, records)
    assert (tally.done, tally.failed, tally.lost) == (len(jobs), 0, 0)
    producer.close()
