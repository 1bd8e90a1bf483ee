"""Recovery: a Redis that lost its data knows the model again within one heartbeat, a model can
be declared before any worker runs, and a dead worker's messages go back to work within
seconds of its heartbeat expiring, not after the visibility timeout."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from hashlib import sha256
from pathlib import Path

import fakeredis
import pytest
import redis
from click.testing import CliRunner

from contract import keys, registry
from contract.errors import InvalidRequest, UnsupportedModel
from contract.messaging import make_celery
from contract.registry import ModelInfo
from producer.cli import main as producer_cli
from producer.client import Client
from tests.faults_support import (
    MODEL,
    NUM_CLASSES,
    SETTLE_S,
    ImageServer,
    Workers,
    account,
    held_layout,
    settle,
    statuses,
    stuck_in_flight,
    tiny_model_args,
    wait_until,
)
from tests.support import RedisServer, write_images
from worker.recovery import UNACKED_INDEX, Reaper, record_held

# A short heartbeat, so that "within one heartbeat" is quick to test.
_BEAT_S = "0.5"


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    return write_images(tmp_path / "images", 64, width=48, height=48)


@pytest.fixture
def model_args(tmp_path: Path, images: list[Path]) -> list[str]:
    return [
        *tiny_model_args(tmp_path / "model"),
        "--allowed-root", str(images[0].parent), "--http-allow-network", "127.0.0.0/8",
    ]  # fmt: skip


@pytest.fixture
def volatile_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server with no persistence at all: a restart forgets everything."""
    workdir = tmp_path / "volatile"
    workdir.mkdir()
    server = RedisServer(workdir, appendonly=False).start()
    yield server
    server.stop()


# -- registration --------------------------------------------------------------------------


def _accepted(producer: Client) -> bool:
    try:
        producer.check_model(MODEL, 1)
    except UnsupportedModel:
        return False
    return True


def test_a_redis_restart_without_persistence_is_healed_by_the_next_heartbeat(
    volatile_redis: RedisServer, model_args, images, tmp_path, torch_home
) -> None:
    producer = Client.from_url(volatile_redis.url)
    with Workers(volatile_redis.url, tmp_path, torch_home, model_args) as workers:
        workers.start("--heartbeat-s", _BEAT_S)
        before = producer.submit(str(images[0]), model=MODEL)
        assert settle(producer, [before.id])[0].status == "done"

        volatile_redis.stop(kill=True)
        volatile_redis.start()  # same port, empty: no model record, no queue, no job
        assert registry.get_model(producer.redis, MODEL) is None
        wait_until(lambda: _accepted(producer), "the model registered again")
        after = [j.id for j in producer.submit_many([str(p) for p in images], model=MODEL)]
        records = settle(producer, after)

    tally = account("redis-restart-no-persistence", producer.redis, records)
    assert (tally.done, tally.failed, tally.lost) == (len(images), 0, 0)
    producer.close()


def test_a_declared_model_queues_jobs_until_a_worker_starts(
    redis_url: str, model_args, images, start_worker
) -> None:
    producer = Client.from_url(redis_url)
    with pytest.raises(UnsupportedModel):
        producer.submit(str(images[0]), model=MODEL)

    # The weights ID the worker will register: declaring it queues jobs for that version.
    model_file = Path(model_args[model_args.index("--model-file") + 1])
    weights = f"torchscript:{model_file.name}#{sha256(model_file.read_bytes()).hexdigest()[:12]}"
    declared = CliRunner().invoke(
        producer_cli,
        ["models", "declare", MODEL, "--num-classes", str(NUM_CLASSES), "--weights", weights,
         "--redis-url", redis_url],
    )  # fmt: skip
    assert declared.exit_code == 0, declared.output
    with pytest.raises(InvalidRequest):  # top_k is checked against the declared classes
        producer.submit(str(images[0]), model=MODEL, top_k=NUM_CLASSES + 1)
    ids = [j.id for j in producer.submit_many([str(p) for p in images], model=MODEL)]
    assert statuses(producer, ids) == {"queued": len(ids)}

    start_worker(MODEL, *model_args)
    records = settle(producer, ids)
    assert [r.status for r in records if r] == ["done"] * len(ids)
    listed = CliRunner().invoke(producer_cli, ["models", "list", "--redis-url", redis_url])
    shown = [json.loads(line) for line in listed.output.splitlines()]
    # The worker's registration of the declared version, the default.
    assert [(m["name"], m["declared"], m["default"]) for m in shown] == [(MODEL, False, True)]
    producer.close()


def test_a_registration_and_a_declaration_never_overwrite_each_other() -> None:
    client = fakeredis.FakeRedis()
    declared = registry.declare_model(client, "m", 10, "W1")
    other = ModelInfo("m", "W2", False, 1000, "cuda:0")
    registry.register_model(client, other)
    # The declaration names the default version; another version's worker does not change it.
    assert registry.get_model(client, "m") == declared
    assert registry.get_model(client, "m", other.version) == other

    worker = ModelInfo("m", "W1", False, 10, "cuda:0")  # a worker of the declared version
    registry.register_model(client, worker)
    assert worker.version == declared.version
    assert registry.get_model(client, "m") == worker

    client.delete(keys.model_key("m", worker.version))  # Redis lost it; the declaration remains
    assert registry.get_model(client, "m") == declared


def test_without_a_declaration_the_newest_version_is_the_default() -> None:
    client = fakeredis.FakeRedis()
    old, new = ModelInfo("m", "W1", False, 10), ModelInfo("m", "W1", False, 3)
    registry.register_model(client, old)
    registry.register_model(client, new)
    registry.register_model(client, old)  # beating again does not make it newer

    assert old.version != new.version
    assert registry.get_model(client, "m") == new
    assert registry.versions(client, "m") == [old.version, new.version]


# -- recovery of a dead worker's messages -------------------------------------------------


def _reaper(client: redis.Redis, url: str, worker_id: str) -> Reaper:
    return Reaper(client, make_celery(url), MODEL, worker_id, interval_s=1, held_ttl_s=60)


def test_a_sweep_makes_only_dead_workers_messages_due(redis_url: str, redis_client) -> None:
    now = time.time()
    redis_client.zadd(UNACKED_INDEX, {"dead-tag": now, "live-tag": now, "acked": now})
    for owner, tag in [("dead", "dead-tag"), ("dead", "gone-tag"), ("live", "live-tag")]:
        record_held(redis_client, keys.held_key(MODEL, owner), tag)
    registry.heartbeat(redis_client, MODEL, "live", {}, ttl_s=60)
    registry.heartbeat(redis_client, MODEL, "me", {}, ttl_s=60)
    reaper = _reaper(redis_client, redis_url, "me")

    assert reaper.sweep() == 0  # missing once is not dead yet
    assert redis_client.zscore(UNACKED_INDEX, "dead-tag") == pytest.approx(now)
    assert reaper.sweep() == 1  # missing twice: due at once; the acked tag stays absent
    assert redis_client.zscore(UNACKED_INDEX, "dead-tag") == 0
    assert redis_client.zscore(UNACKED_INDEX, "gone-tag") is None
    assert redis_client.zscore(UNACKED_INDEX, "live-tag") == pytest.approx(now)
    assert not redis_client.exists(keys.held_key(MODEL, "dead"))
    assert redis_client.smembers(keys.held_sets_key()) == {keys.held_key(MODEL, "live").encode()}


def test_a_worker_reclaims_what_its_previous_process_held(redis_url: str, redis_client) -> None:
    redis_client.zadd(UNACKED_INDEX, {"old-tag": time.time()})
    redis_client.sadd(keys.held_key(MODEL, "me"), "old-tag")
    registry.heartbeat(redis_client, MODEL, "me", {}, ttl_s=60)  # the new process beats already
    reaper = _reaper(redis_client, redis_url, "me")
    reaper.start()
    reaper.stop()
    assert redis_client.zscore(UNACKED_INDEX, "old-tag") == 0


@pytest.mark.slow
def test_a_killed_worker_holding_every_message_recovers_within_seconds(
    start_worker, model_args, redis_url, redis_client, images
) -> None:
    """Default heartbeat and visibility timeout (300 s): recovery must not wait for the latter."""
    messages = 8
    defaults_args = [*model_args, "--visibility-timeout", "300"]
    producer = Client.from_url(redis_url)
    with ImageServer() as server:
        holder = start_worker(MODEL, *defaults_args, "--concurrency", str(messages))
        ids = [
            j.id for j in producer.submit_many(held_layout(server, images, messages), model=MODEL)
        ]
        stuck_in_flight(server, producer, ids, messages)  # it holds every queued message
        start_worker(MODEL, *defaults_args, "--concurrency", "4")

        holder.kill()
        killed = time.monotonic()
        server.release()
        records = settle(producer, ids, timeout=SETTLE_S)  # well under the 300 s timeout
        recovery_s = time.monotonic() - killed

    tally = account("worker-kill-9-recovery", redis_client, records)
    print(f"RECOVERY worker-kill-9 seconds={recovery_s:.1f}")
    assert (tally.done, tally.failed, tally.lost) == (len(ids), 0, 0)
    assert tally.written_done == len(ids)  # stored once
    assert tally.redelivered == messages  # the held job of each message, retried alone
    producer.close()
