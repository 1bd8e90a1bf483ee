"""Dead letters: one writer and one entry shape (a malformed message, a job whose record is
missing), a list bounded by length and age, and that list read, replayed and purged with
``python -m producer dead-letter`` against a real redis-server."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import fakeredis
import pytest
import redis

from contract import deadletter, keys
from contract.errors import MalformedMessage
from contract.job import ErrorInfo, Job
from contract.messaging import TASK_NAME, make_celery
from contract.store import JobStore
from tests.support import ROOT
from worker.deadletter import DeadLetters, is_job_ids
from worker.metrics import Metrics
from worker.service import Service

MODEL = "m"
_SHAPE = {"reason", "queue", "message", "worker", "at"}


def _ats(client: redis.Redis) -> list[float]:
    return [e.data["at"] for e in deadletter.entries(client)]


def test_the_list_keeps_only_the_newest_entries_up_to_its_cap() -> None:
    client = fakeredis.FakeRedis()
    for n in range(7):
        deadletter.append(client, {"reason": "x"}, now=1000.0 + n, max_entries=5)

    assert _ats(client) == [1002.0, 1003.0, 1004.0, 1005.0, 1006.0]


def test_entries_older_than_the_max_age_go_when_a_new_one_is_written() -> None:
    client = fakeredis.FakeRedis()
    deadletter.append(client, {"reason": "old"}, {"reason": "old"}, now=1000.0, max_age_s=60)
    deadletter.append(client, {"reason": "kept"}, now=1050.0, max_age_s=60)
    deadletter.append(client, {"reason": "new"}, now=1070.0, max_age_s=60)

    assert [e.data["reason"] for e in deadletter.entries(client)] == ["kept", "new"]


def _message(redis_url: str, job_ids: list[str]) -> str:
    """A classify message for ``job_ids``, exactly as the producer puts it on a queue."""
    celery = make_celery(redis_url)
    celery.send_task(TASK_NAME, args=[job_ids], queue="scratch", routing_key="scratch")
    celery.close()
    client = redis.Redis.from_url(redis_url)
    raw = client.rpop("scratch").decode()
    client.close()
    return raw


def _cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producer", "dead-letter", args[0], "--redis-url", redis_url,
         *args[1:]],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def test_list_replay_and_purge_from_the_command_line(
    redis_url: str, redis_client: redis.Redis
) -> None:
    store = JobStore(redis_client)
    queued, done = (
        Job(id=i, uri="a.jpg", model=MODEL, top_k=1, version="v1") for i in ("q1", "d1")
    )
    store.create_many([queued, done.failed(ErrorInfo("not_found", "gone"), 1.0)])
    queue = keys.queue_name(MODEL, "v1")
    deadletter.append(redis_client, {"reason": "garbage", "queue": queue, "message": "junk"})
    message = _message(redis_url, ["q1", "d1"])
    deadletter.append(redis_client, {"reason": "sets eta=…", "queue": queue, "message": message})

    listed = _cli(redis_url, "list")
    first = _cli(redis_url, "list", "--limit", "1")
    replayed = _cli(redis_url, "replay", "--all")

    assert [json.loads(line)["reason"] for line in listed.stdout.splitlines()] == [
        "garbage",
        "sets eta=…",
    ]
    assert [json.loads(line)["index"] for line in first.stdout.splitlines()] == [0]
    assert replayed.returncode == 0, replayed.stderr
    assert [json.loads(line) for line in replayed.stdout.splitlines()] == [
        {"index": 0, "replayable": False, "resent": []},
        {"index": 1, "replayable": True, "resent": ["q1"]},
    ]
    sent = json.loads(redis_client.lpop(queue))
    assert json.loads(base64.b64decode(sent["body"]))[0] == [["q1"]]
    assert [e.data["reason"] for e in deadletter.entries(redis_client)] == ["garbage"]

    purged = _cli(redis_url, "purge")

    assert "purged 1" in purged.stderr and redis_client.llen(keys.dead_letter_key()) == 0


# -- one writer, one entry shape ------------------------------------------------------------


@pytest.fixture
def service() -> Service:
    client = fakeredis.FakeRedis()
    service = Service.__new__(Service)  # only what claiming and dead-lettering use
    service.model, service.worker_id, service.max_attempts = "m", "w1", 3
    service.version = "v1"
    service.store, service.clock, service.metrics = JobStore(client), lambda: 1.0, Metrics("m")
    service.dead_letters = DeadLetters(client, "w1")
    return service


def _entries(service: Service) -> list[dict[str, object]]:
    raw = service.store.redis.lrange(keys.dead_letter_key(), 0, -1)
    return [json.loads(e) for e in raw]


def test_a_message_that_is_not_a_list_of_ids_is_dead_lettered_whole(service: Service) -> None:
    with pytest.raises(MalformedMessage):
        service.handle({"not": "ids"})
    (entry,) = _entries(service)
    assert set(entry) == _SHAPE
    assert (entry["queue"], entry["worker"]) == (keys.queue_name("m", "v1"), "w1")
    assert json.loads(str(entry["message"])) == {"not": "ids"}


def test_jobs_with_no_record_are_dead_lettered_in_one_entry_of_the_same_shape(
    service: Service,
) -> None:
    outcome = service.handle(["gone", "lost"])
    assert outcome.skipped == 2
    (entry,) = _entries(service)
    assert set(entry) == _SHAPE | {"job_ids", "missing", "corrupt"}
    assert entry["reason"] == "records missing or corrupt"
    assert (entry["job_ids"], entry["missing"], entry["corrupt"]) == (["gone", "lost"], 2, 0)
    assert json.loads(str(entry["message"])) == ["gone", "lost"]


def test_a_queue_message_is_dead_lettered_in_the_same_shape() -> None:
    letters = DeadLetters(fakeredis.FakeRedis(), "w1")
    letters.record("unknown task 'x'", queue="q", message="{}")
    (raw,) = letters.redis.lrange(keys.dead_letter_key(), 0, -1)
    assert set(json.loads(raw)) == _SHAPE


@pytest.mark.parametrize(
    ("value", "ok"), [(["a", "b"], True), ([], True), ("a", False), ([1], False), (None, False)]
)
def test_the_one_job_ids_check(value: object, ok: bool) -> None:
    assert is_job_ids(value) is ok
