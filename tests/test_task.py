"""The Celery task's last line of defence: an unexpected failure never leaves jobs running."""

from __future__ import annotations

import fakeredis
import pytest

from contract.errors import MalformedMessage
from contract.job import ErrorInfo, Job, Prediction
from contract.messaging import TASK_NAME, make_celery
from contract.store import JobStore
from worker.app import MESSAGE_RETRIES, register_task
from worker.service import Service


class Flaky:
    """Stands in for the Service: ``handle`` always fails with ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.handled = 0
        self.failed: list[tuple[list[str], Exception]] = []

    def handle(self, job_ids: list[str]) -> None:
        self.handled += 1
        raise self.error

    def fail_unfinished(self, job_ids: list[str], cause: Exception) -> None:
        self.failed.append((job_ids, cause))


def _run(service: Flaky) -> object:
    app = make_celery("redis://127.0.0.1:1/0")
    app.conf.task_always_eager = True
    register_task(app, service)  # type: ignore[arg-type]
    return app.tasks[TASK_NAME].apply(args=[["a", "b"]])


def test_an_unexpected_failure_is_retried_then_its_jobs_are_failed() -> None:
    service = Flaky(RuntimeError("boom"))
    result = _run(service)
    assert result.failed()
    assert service.handled == MESSAGE_RETRIES + 1
    assert [ids for ids, _ in service.failed] == [["a", "b"]]


def test_a_malformed_message_is_not_retried() -> None:
    service = Flaky(MalformedMessage("not a list"))
    _run(service)
    assert service.handled == 1
    assert service.failed == []


@pytest.fixture
def store() -> JobStore:
    return JobStore(fakeredis.FakeRedis())


def test_failing_unfinished_jobs_leaves_finished_ones_alone(store: JobStore) -> None:
    jobs = [Job(id=i, uri="u", model="m", top_k=1, submitted=0.0) for i in ("q", "r", "d")]
    store.create_many(jobs)
    store.claim_many(["r"], "m", 1.0, "w", fresh_only=True)
    done = jobs[2].done([Prediction("x", 0, 1.0)], "W", False, 2.0)
    store.finish_many([done])
    service = Service.__new__(Service)
    service.store, service.clock = store, lambda: 3.0
    service.fail_unfinished(["q", "r", "d", "missing"], RuntimeError("boom"))
    q, r, d = store.get_many(["q", "r", "d"])
    assert (q.status, q.error.type) == ("failed", "internal")
    assert (r.status, r.error.type) == ("failed", "internal")
    assert "boom" in r.error.message
    assert d == done
    assert isinstance(q.error, ErrorInfo)
