"""The job contract: schema round trips, validation, and the store's state machine (fakeredis)."""

from __future__ import annotations

import json
import os

import fakeredis
import pytest

from contract import keys, record
from contract.errors import InvalidRequest, MalformedRecord
from contract.job import (
    ErrorInfo,
    Job,
    Prediction,
    validate_job_id,
    validate_model_name,
    validate_top_k,
    validate_uri,
)
from contract.store import ALREADY_FINAL, CLAIMED, CORRUPT, MISSING, POISONED, SUSPECT, JobStore


def _job(job_id: str = "j1") -> Job:
    return Job(id=job_id, uri="img.jpg", model="m", top_k=3, submitted=100.0)


@pytest.fixture
def store() -> JobStore:
    return JobStore(fakeredis.FakeRedis(), ttl_s=60)


def test_a_done_record_round_trips_through_json() -> None:
    job = _job().done([Prediction("cat", 281, 0.75), Prediction("dog", 1, 0.2)], "W", False, 1.0)
    assert Job.decode(job.encode()) == job
    assert json.loads(job.encode())["predictions"][0] == {
        "label": "cat",
        "index": 281,
        "probability": 0.75,
    }


def test_a_failed_record_carries_type_and_message() -> None:
    job = _job().failed(ErrorInfo("not_found", "no such file"), 2.0)
    data = json.loads(job.encode())
    assert data["status"] == "failed"
    assert data["error"] == {"type": "not_found", "message": "no such file"}


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1,2]",
        b'{"id": "x"}',
        b'{"id":"x","uri":"u","model":"m","top_k":1,"status":"exploded"}',
    ],
)
def test_records_that_break_the_schema_raise_decode_error(raw: bytes) -> None:
    with pytest.raises(MalformedRecord):
        Job.decode(raw)


@pytest.mark.parametrize("top_k", [0, -1, 1001, True, "5", 2.5])
def test_top_k_out_of_range_is_refused(top_k: object) -> None:
    with pytest.raises(InvalidRequest):
        validate_top_k(top_k)  # type: ignore[arg-type]


def test_top_k_above_the_models_classes_is_refused() -> None:
    assert validate_top_k(10, num_classes=10) == 10
    with pytest.raises(InvalidRequest):
        validate_top_k(11, num_classes=10)


@pytest.mark.parametrize("uri", ["", "ftp://host/x.jpg", "gopher://x", "a\x00b", "x" * 5000])
def test_bad_uris_are_refused(uri: str) -> None:
    with pytest.raises(InvalidRequest):
        validate_uri(uri)


@pytest.mark.parametrize(
    "uri", ["photo.jpg", "/data/a b.jpg", "s3://b/k.jpg", "HTTPS://h/x", "file:///data/x.png"]
)
def test_supported_uris_pass(uri: str) -> None:
    assert validate_uri(uri) == uri


@pytest.mark.parametrize("job_id", ["", "-x", "a/b", "a b", "x" * 200])
def test_bad_job_ids_are_refused(job_id: str) -> None:
    with pytest.raises(InvalidRequest):
        validate_job_id(job_id)


@pytest.mark.parametrize("validate", [validate_uri, validate_job_id])
def test_text_that_is_not_utf8_is_refused_with_the_reason(validate) -> None:
    latin1_name = os.fsdecode(b"caf\xe9.jpg")  # a Latin-1 file name on a UTF-8 system

    with pytest.raises(InvalidRequest, match="not valid UTF-8"):
        validate(latin1_name)


def test_creating_an_existing_id_leaves_the_first_record(store: JobStore) -> None:
    assert store.create_many([_job()]) == [True]
    assert store.create_many([_job().failed(ErrorInfo("x", "y"), 1.0)]) == [False]
    assert store.get("j1") == _job()
    assert 0 < store.redis.ttl(keys.job_key("j1")) <= max(60, _job().ttl_s)


def test_claim_marks_running_and_counts_the_attempt(store: JobStore) -> None:
    store.create_many([_job()])
    (claim,) = store.claim_many(["j1"], "m", 200.0, "w1", fresh_only=True)
    assert claim.state == CLAIMED
    assert (claim.job.status, claim.job.attempts, claim.job.worker) == ("running", 1, "w1")
    assert store.get("j1").started == 200.0


def test_a_started_job_is_a_suspect_for_fresh_claims(store: JobStore) -> None:
    store.create_many([_job()])
    store.claim_many(["j1"], "m", 1.0, "w1", fresh_only=True)
    (again,) = store.claim_many(["j1"], "m", 2.0, "w2", fresh_only=True)
    assert again.state == SUSPECT
    assert store.get("j1").attempts == 1


def test_a_job_whose_worker_died_too_often_fails_as_poison(store: JobStore) -> None:
    store.create_many([_job()])
    for _ in range(2):
        store.claim_many(["j1"], "m", 1.0, "w", fresh_only=False, max_attempts=2)
    (claim,) = store.claim_many(["j1"], "m", 3.0, "w", fresh_only=False, max_attempts=2)
    assert claim.state == POISONED
    record = store.get("j1")
    assert (record.status, record.error.type, record.attempts) == ("failed", "poison", 2)
    assert (record.uri, record.started, record.worker, record.finished) == (
        "img.jpg",
        1.0,
        "w",
        3.0,
    )
    assert claim.job == record
    assert store.stats("m")["failed"] == 1


def test_a_result_is_written_once(store: JobStore) -> None:
    store.create_many([_job()])
    first = _job().done([Prediction("a", 0, 1.0)], "W", False, 5.0)
    second = _job().done([Prediction("b", 1, 1.0)], "W", False, 6.0)
    assert store.finish_many([first]) == [True]
    assert store.finish_many([second]) == [False]
    assert store.get("j1") == first
    assert store.stats("m") == {"done": 1, "duplicate": 1}


def test_final_and_missing_jobs_are_not_claimed(store: JobStore) -> None:
    store.create_many([_job()])
    store.finish_many([_job().failed(ErrorInfo("x", "y"), 1.0)])
    claims = store.claim_many(["j1", "nope"], "m", 2.0, "w", fresh_only=False)
    assert [c.state for c in claims] == [ALREADY_FINAL, MISSING]


def test_finishing_announces_the_ids_on_the_channel(store: JobStore) -> None:
    pubsub = store.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.finished_channel())
    store.create_many([_job("a"), _job("b")])
    store.finish_many([_job(i).failed(ErrorInfo("x", "y"), 1.0) for i in ("a", "b")])
    messages = [pubsub.get_message(timeout=0.5) for _ in range(3)]
    assert [json.loads(m["data"]) for m in messages if m] == [["a", "b"]]


@pytest.mark.parametrize("value", ["abc\n", "abc\r\n"])
def test_ids_and_model_names_with_a_trailing_newline_are_refused(value: str) -> None:
    with pytest.raises(InvalidRequest):
        validate_job_id(value)
    with pytest.raises(InvalidRequest):
        validate_model_name(value)


def test_a_job_key_holding_something_else_is_reported_corrupt_not_raised(store: JobStore) -> None:
    store.create_many([_job("good")])
    store.redis.rpush(keys.job_key("list"), "x")
    store.redis.set(keys.job_key("odd"), "[1, 2]")
    store.redis.set(keys.job_key("text"), '"text"')
    claims = store.claim_many(["list", "good", "odd", "text"], "m", 1.0, "w", fresh_only=True)
    assert [c.state for c in claims] == [CORRUPT, CLAIMED, CORRUPT, CORRUPT]


def test_a_record_of_the_hash_format_is_refused_naming_the_format(store: JobStore) -> None:
    """Records written before the packed format (issue 10) are hashes: never run, never read
    as missing."""
    store.redis.hset(keys.job_key("old"), mapping={"u": "a.jpg", "m": "m", "k": 3, "s": "q"})

    (claim,) = store.claim_many(["old"], "m", 2.0, "w", fresh_only=False)

    assert claim.state == CORRUPT
    with pytest.raises(MalformedRecord, match="hash, the format before packed records"):
        store.get("old")


def test_a_record_with_an_unknown_status_code_is_corrupt_and_left_alone(store: JobStore) -> None:
    store.create_many([_job("odd")])
    key = keys.job_key("odd")
    store.redis.setrange(key, record.STATUS_AT, b"?")
    before = store.redis.get(key)

    (claim,) = store.claim_many(["odd"], "m", 2.0, "w", fresh_only=False)

    assert claim.state == CORRUPT and store.redis.get(key) == before
    with pytest.raises(MalformedRecord):
        store.get("odd")


@pytest.mark.parametrize("cut", [1, record.HEADER_BYTES - 1, record.HEADER_BYTES + 3])
def test_a_record_cut_short_is_corrupt_for_claims_and_readers(store: JobStore, cut: int) -> None:
    store.create_many([_job("short")])
    key = keys.job_key("short")
    store.redis.set(key, store.redis.get(key)[:cut])

    (claim,) = store.claim_many(["short"], "m", 2.0, "w", fresh_only=False)

    assert claim.state == CORRUPT
    with pytest.raises(MalformedRecord):
        store.get("short")


def test_the_gateways_job_model_is_the_job_dataclass() -> None:
    from dataclasses import fields

    from producer.api_schema import JobOut

    done = _job().done([Prediction("cat", 281, 0.75)], "W", False, 1.0)
    failed = _job().failed(ErrorInfo("not_found", "gone"), 1.0)
    assert list(JobOut.model_fields) == [f.name for f in fields(Job)]
    assert all(f.is_required() for f in JobOut.model_fields.values())
    for job in (_job(), done, failed):
        assert JobOut.model_validate(job.to_dict()).model_dump(mode="json") == job.to_dict()
