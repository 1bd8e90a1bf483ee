"""The job state machine has one source, ``contract.job.TRANSITIONS``: the Python records and the
store's Lua scripts (on a real redis-server) are both checked against it, from every status."""

from __future__ import annotations

import itertools

import pytest
import redis

from contract import keys
from contract.errors import PoisonJob
from contract.job import FINAL, TRANSITIONS, ErrorInfo, Job, JobStatus, Prediction
from contract.store import ClaimState, JobStore

MAX_ATTEMPTS = 2
# Attempts a stored record may carry: never started, started once, started too often.
ATTEMPTS = (0, 1, MAX_ATTEMPTS)
# Deadlines a stored record may carry: none, or one that passed before the claims at 3.0.
DEADLINES = (None, 2.5)


def _record(status: JobStatus, attempts: int, deadline: float | None = None) -> Job:
    job = Job(
        id="j", uri="a.jpg", model="m", top_k=1, submitted=1.0, attempts=attempts, deadline=deadline
    )
    if status is JobStatus.DONE:
        return job.done([Prediction("cat", 0, 1.0)], "W", False, 2.0)
    if status is JobStatus.FAILED:
        return job.failed(ErrorInfo("not_found", "gone"), 2.0)
    return Job(**{**job.to_dict(), "status": status, "predictions": None, "error": None})


def _claim(store: JobStore, fresh_only: bool) -> ClaimState:
    (claim,) = store.claim_many(
        ["j"], "m", 3.0, "w", fresh_only=fresh_only, max_attempts=MAX_ATTEMPTS
    )
    return claim.state


def _finish(store: JobStore, final: JobStatus) -> None:
    job = _record(JobStatus.RUNNING, 1)
    store.finish_many([_record(final, job.attempts) if final in FINAL else job])


# Every operation the Lua scripts perform on a record.
OPERATIONS = {
    "claim fresh": lambda store: _claim(store, fresh_only=True),
    "claim any": lambda store: _claim(store, fresh_only=False),
    "finish done": lambda store: _finish(store, JobStatus.DONE),
    "finish failed": lambda store: _finish(store, JobStatus.FAILED),
    "cancel": lambda store: store.cancel_many(["j"], 3.0),
}


def _observe(
    client: redis.Redis, status: JobStatus, attempts: int, deadline: float | None, operation: str
) -> JobStatus | None:
    """The status ``operation`` moved a stored record to, or None when it left it as it was."""
    client.flushdb()
    store = JobStore(client, ttl_s=60)
    store.create_many([_record(status, attempts, deadline)])
    before = client.get(keys.job_key("j"))
    OPERATIONS[operation](store)
    if client.get(keys.job_key("j")) == before:
        return None
    after = store.get("j")
    assert after is not None
    return after.status


def test_the_lua_scripts_make_exactly_the_transitions_of_the_table(
    redis_client: redis.Redis,
) -> None:
    observed = set()
    cases = itertools.product(JobStatus, ATTEMPTS, DEADLINES, OPERATIONS)
    for status, attempts, deadline, operation in cases:
        after = _observe(redis_client, status, attempts, deadline, operation)
        if after is not None:
            assert after in TRANSITIONS[status], (status, attempts, deadline, operation, after)
            observed.add((status, after))
    table = {(before, after) for before, afters in TRANSITIONS.items() for after in afters}
    assert observed == table


@pytest.mark.parametrize("status", [JobStatus.QUEUED, JobStatus.RUNNING])
def test_a_claim_of_a_job_started_too_often_fails_it_as_poison(
    redis_client: redis.Redis, status: JobStatus
) -> None:
    redis_client.flushdb()
    store = JobStore(redis_client, ttl_s=60)
    store.create_many([_record(status, MAX_ATTEMPTS)])
    assert _claim(store, fresh_only=False) is ClaimState.POISONED
    job = store.get("j")
    assert job is not None and job.error is not None
    assert (job.status, job.error.type) == (JobStatus.FAILED, PoisonJob.type)


@pytest.mark.parametrize("status", list(JobStatus))
def test_python_records_move_only_along_the_table(status: JobStatus) -> None:
    job = _record(status, 1)
    for moved in (
        job.done([Prediction("cat", 0, 1.0)], "W", False, 5.0),
        job.failed(ErrorInfo("internal", "x"), 5.0),
    ):
        assert moved.status in TRANSITIONS[status] or status in FINAL
    assert job.is_final == (not TRANSITIONS[status])


def test_statuses_keep_their_wire_format() -> None:
    for status in JobStatus:
        assert Job.decode(_record(status, 0).encode()).status is status
        assert f"{status}" == str(status) == status.value
