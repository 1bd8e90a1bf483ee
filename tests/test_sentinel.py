"""Redis Sentinel: one URL form for workers, producers, the gateway and the broker, and a real
failover.

The failover test runs a redis-server primary, a replica and a sentinel on loopback, kills the
primary (SIGKILL) while a worker holds messages, submits more through the Python API and the
gateway, and accounts for every job.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from contract.connection import celery_broker, connect, parse_sentinel_url
from contract.job import Job
from contract.messaging import make_celery
from producer.client import Client
from tests.faults_support import (
    CHUNK,
    MODEL,
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
from tests.support_gateway import GatewayProcess
from tests.support_sentinel import SERVICE, SentinelProcess

# Messages held in flight (their HTTP job trickles until released), and the worker's
# concurrency: the other slots keep storing results of local images when the primary dies.
_HELD = 4
_CONCURRENCY = 8
_BUSY_JOBS = 1280


# -- the URL ---------------------------------------------------------------------------------


def test_a_sentinel_url_names_the_sentinels_the_service_and_the_database() -> None:
    target = parse_sentinel_url("redis+sentinel://:s%40cret@10.0.0.1:26380,[::1],h3/mymaster/2")
    assert target.sentinels == (("10.0.0.1", 26380), ("::1", 26379), ("h3", 26379))
    assert (target.service, target.db, target.password) == ("mymaster", 2, "s@cret")


@pytest.mark.parametrize(
    "url", ["redis+sentinel://h1:26379", "redis+sentinel:///mymaster", "redis+sentinel://h/m/x"]
)
def test_a_sentinel_url_without_a_service_or_with_a_bad_database_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="service_name"):
        parse_sentinel_url(url)


def test_the_broker_gets_kombus_sentinel_form_with_the_master_name() -> None:
    broker, options = celery_broker("redis+sentinel://:pw@127.0.0.1:1,127.0.0.2:2/mymaster/3")
    assert broker == "sentinel://:pw@127.0.0.1:1/3;sentinel://:pw@127.0.0.2:2/3"
    assert options["master_name"] == "mymaster"
    app = make_celery("redis+sentinel://127.0.0.1:1/mymaster")
    assert app.conf.broker_transport_options["master_name"] == "mymaster"
    assert app.conf.broker_url.startswith("sentinel://127.0.0.1:1/0")


def test_plain_urls_go_to_redis_unchanged() -> None:
    assert celery_broker("rediss://h:1/0") == ("rediss://h:1/0", {})
    client = connect("unix:///tmp/nothing.sock?db=4")
    assert client.connection_pool.connection_kwargs["db"] == 4


# -- a real failover -------------------------------------------------------------------------


@pytest.fixture
def group(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer, SentinelProcess]]:
    """A primary, its replica and a sentinel with quorum 1, all on 127.0.0.1."""
    dirs = [tmp_path / name for name in ("primary", "replica", "sentinel")]
    for d in dirs:
        d.mkdir()
    primary = RedisServer(dirs[0]).start()
    replica = RedisServer(dirs[1]).start("--replicaof", "127.0.0.1", str(primary.port))
    sentinel = SentinelProcess(dirs[2], primary.port).start()
    try:
        wait_until(lambda: _link_up(replica), "the replica's link to the primary", 30)
        wait_until(lambda: sentinel.knows_replicas() == 1, "the sentinel to find the replica", 30)
        yield primary, replica, sentinel
    finally:
        sentinel.stop()
        replica.stop()
        primary.stop()


def _link_up(replica: RedisServer) -> bool:
    client = redis.Redis(port=replica.port)
    try:
        return client.info("replication").get("master_link_status") == "up"
    finally:
        client.close()


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    return write_images(tmp_path / "images", 200, width=48, height=48)


def _submit(producer: Client, uris: list[str]) -> list[str]:
    return [j.id for j in producer.submit_many(uris, model=MODEL)]


def _never_started(job: Job) -> bool:
    return job.status == "queued" and job.attempts == 0 and job.started is None


def _submit_over_http(url: str, workdir: Path, images: list[Path]) -> list[str]:
    """The gateway, started on the sentinel URL after the failover, finds the new primary."""
    gateway = GatewayProcess(url, workdir).start()
    try:
        body = {"jobs": [{"uri": str(p)} for p in images], "model": MODEL}
        posted = httpx.post(f"{gateway.url}/v1/jobs", json=body, timeout=30)
    finally:
        gateway.stop()
    assert posted.status_code == 202, posted.text
    return [j["id"] for j in posted.json()["jobs"]]


@pytest.mark.slow
def test_a_sentinel_failover_mid_run_accounts_for_every_job(
    group, images, tmp_path: Path, torch_home: str
) -> None:
    primary, replica, sentinel = group
    url = f"redis+sentinel://127.0.0.1:{sentinel.port}/{SERVICE}/0"
    args = [
        *tiny_model_args(tmp_path / "model"),
        "--allowed-root", str(images[0].parent), "--http-allow-network", "127.0.0.0/8",
        "--concurrency", str(_CONCURRENCY),
    ]  # fmt: skip
    producer = Client.from_url(url)
    with ImageServer() as server, Workers(url, tmp_path, torch_home, args) as workers:
        workers.start()
        ids = _submit(producer, held_layout(server, images, _HELD))
        stuck_in_flight(server, producer, ids, _HELD)
        busy = _submit(producer, [str(images[i % len(images)]) for i in range(_BUSY_JOBS)])
        wait_until(lambda: statuses(producer, busy).get("done", 0) >= CHUNK, "results flowing")
        ids += busy

        primary.stop(kill=True)  # SIGKILL: messages held, results being stored
        wait_until(lambda: sentinel.primary_port() == replica.port, "the sentinel's failover", 60)
        server.release()
        ids += _submit(producer, [str(p) for p in images])
        ids += _submit_over_http(url, tmp_path, images[:50])
        records = settle(producer, ids)

    client = connect(url)
    tally = account("sentinel-failover", client, records)
    # Replication is asynchronous, and kombu takes a message off the queue (BRPOP) and records
    # it as unacknowledged in a second command: a message in that gap when the primary dies
    # exists on neither the promoted replica nor anywhere else. Its jobs stay queued, never
    # started. Only messages being delivered at the kill can go: at most one per consumer slot.
    unfinished = [r for r in records if r is None or r.status not in ("done", "failed")]
    lost_with_primary = [r for r in unfinished if r is not None and _never_started(r)]
    assert lost_with_primary == unfinished, tally.line()
    assert len(lost_with_primary) <= _CONCURRENCY * CHUNK, tally.line()
    assert tally.failed == 0, tally.line()
    assert tally.executed_twice == 0, tally.line()
    print(f"SENTINEL-FAILOVER lost_with_the_primary={len(lost_with_primary)}")
    producer.close()
    client.close()
