"""`producer cancel`, `submit --deadline-s/--ttl-s` and the exit status of cancelled or expired
jobs, as a person at a terminal runs them. Real redis-server; a model registered with no
worker, so jobs stay queued until the test cancels them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from contract import keys
from contract.errors import NotFound
from contract.job import ErrorInfo
from producer.client import Client
from tests.support import ROOT, producer_help
from tests.support_gateway import register_idle_model

IDLE = "idle-model"
# Hang guard only.
HANG_S = 60


@pytest.fixture
def client(redis_url: str) -> Iterator[Client]:
    register_idle_model(redis_url, IDLE)
    client = Client.from_url(redis_url)
    yield client
    client.close()


def _producer(
    redis_url: str, *args: str, cwd: Path, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producer", args[0], "--redis-url", redis_url, *args[1:]],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=HANG_S,
    )


def _lines(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines()]


def test_submit_sets_deadline_and_ttl_and_cancel_reads_its_output_from_stdin(
    redis_url: str, client: Client, redis_client: redis.Redis, tmp_path: Path
) -> None:
    before = time.time()
    submitted = _producer(
        redis_url, "submit", "--model", IDLE, "--deadline-s", "600", "--ttl-s", "90",
        "a.jpg", "b.jpg", cwd=tmp_path,
    )  # fmt: skip
    cancelled = _producer(redis_url, "cancel", "-", cwd=tmp_path, stdin=submitted.stdout)

    queued = _lines(submitted.stdout)
    assert submitted.returncode == 0, submitted.stderr
    assert [q["ttl_s"] for q in queued] == [90, 90]
    assert all(before + 600 <= q["deadline"] <= time.time() + 600 for q in queued)  # type: ignore[operator]
    assert cancelled.returncode == 0, cancelled.stderr
    assert _lines(cancelled.stdout) == [
        {"id": q["id"], "outcome": "cancelled", "status": "cancelled", "error": None}
        for q in queued
    ]
    for q in queued:
        assert 0 < redis_client.ttl(keys.job_key(str(q["id"]))) <= 90


def test_cancel_of_a_final_or_unknown_job_is_refused_with_exit_1_and_changes_nothing(
    redis_url: str, client: Client, redis_client: redis.Redis, tmp_path: Path
) -> None:
    job = client.submit("/data/x.jpg", model=IDLE, job_id="once")
    client.cancel(job.id)
    before = redis_client.get(keys.job_key("once"))
    ids = tmp_path / "ids.txt"
    ids.write_text("once\nnever-was\n")

    run = _producer(redis_url, "cancel", "--file", str(ids), cwd=tmp_path)

    assert run.returncode == 1, run.stderr
    final, missing = _lines(run.stdout)
    assert final["outcome"] == "final" and final["status"] == "cancelled"
    assert final["error"]["type"] == "already_final"  # type: ignore[index]
    assert missing["outcome"] == "missing" and missing["status"] is None
    assert missing["error"]["type"] == "not_found"  # type: ignore[index]
    assert redis_client.get(keys.job_key("once")) == before
    assert client.store.stats(IDLE) == {"cancelled": 1}


def test_result_exits_6_for_a_cancelled_job_and_1_when_another_failed(
    redis_url: str, client: Client, tmp_path: Path
) -> None:
    cancelled = client.submit("/data/y.jpg", model=IDLE)
    client.cancel(cancelled.id)
    failed = client.submit("/data/z.jpg", model=IDLE)
    client.store.finish_many([failed.failed(ErrorInfo(NotFound.type, "gone"), time.time())])

    alone = _producer(redis_url, "result", cancelled.id, cwd=tmp_path)
    both = _producer(redis_url, "result", cancelled.id, failed.id, cwd=tmp_path)

    assert alone.returncode == 6, alone.stderr
    assert _lines(alone.stdout)[0]["status"] == "cancelled"
    assert both.returncode == 1, both.stderr


def test_cancel_help_documents_the_exit_statuses() -> None:
    text = producer_help("cancel")

    assert "Exit status" in text
    assert all(f"{code} " in text for code in ("0", "1"))
    assert "6 " in producer_help("submit") and "6 " in producer_help("result")
