"""Dead letters: one writer and one entry shape, for a malformed message and for a job whose
record is missing."""

from __future__ import annotations

import json

import fakeredis
import pytest

from contract import keys
from contract.errors import MalformedMessage
from contract.store import JobStore
from worker.deadletter import DeadLetters, is_job_ids
from worker.metrics import Metrics
from worker.service import Service

_SHAPE = {"reason", "queue", "message", "worker", "at"}


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
