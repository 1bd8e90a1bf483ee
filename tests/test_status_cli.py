"""``python -m producer status`` and the numbers behind it: queue depth, oldest queued job,
live workers (heartbeats) and recent throughput."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import fakeredis
import pytest
import redis
from click.testing import CliRunner

from contract import gauges, keys, registry
from contract.job import Job
from contract.store import JobStore
from producer import status
from producer.cli import main
from producer.client import Client
from tests.support import ROOT, write_images
from tests.support_gateway import register_idle_model

MODEL = "mobilenet_v3_small"
IDLE = "idle-model"
HEADER = ["MODEL", "QUEUED", "OLDEST_S", "WORKERS", "DONE", "FAILED", "CANCELLED", "EXPIRED"]
HEADER += ["JOBS/S"]


def _status(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producer", "status", "--redis-url", redis_url, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        check=True,
    )


def test_oldest_queued_age_is_measured_from_the_job_delivered_next(redis_url: str) -> None:
    register_idle_model(redis_url, IDLE)
    client = Client.from_url(redis_url, chunk_size=2)
    try:
        first = client.submit_many(["a.jpg", "b.jpg"], model=IDLE)[0]
        client.submit_many(["c.jpg"], model=IDLE)
        age = gauges.oldest_queued_age(client.redis, IDLE, now=first.submitted + 10)
        empty = gauges.oldest_queued_age(client.redis, "no-such-model", now=first.submitted)
    finally:
        client.close()

    assert age == pytest.approx(10)
    assert empty is None


def test_throughput_is_jobs_finished_per_second_between_two_samples() -> None:
    fake = fakeredis.FakeRedis()
    registry.register_model(fake, registry.ModelInfo(IDLE, "none", True, 1000))
    fake.hset(keys.stats_key(IDLE), mapping={"done": 10, "failed": 2})
    before = status.snapshot(fake, clock=lambda: 100.0)[0]
    fake.hincrby(keys.stats_key(IDLE), "done", 30)
    fake.hincrby(keys.stats_key(IDLE), "failed", 6)
    after = status.snapshot(fake, clock=lambda: 104.0)[0]

    assert (before.finished, after.finished) == (12, 48)
    assert (after.cancelled, after.expired) == (0, 0)
    assert status.throughput(before, after) == 9.0
    assert status.throughput(after, after) == 0.0


def test_a_snapshot_counts_jobs_cancelled_and_expired_apart_from_those_run() -> None:
    fake = fakeredis.FakeRedis()
    registry.register_model(fake, registry.ModelInfo(IDLE, "none", True, 1000))
    fake.hset(keys.stats_key(IDLE), mapping={"done": 4, "cancelled": 2, "expired": 1})
    state = status.snapshot(fake, clock=lambda: 100.0)[0]

    assert (state.done, state.failed, state.cancelled, state.expired) == (4, 0, 2, 1)
    assert state.finished == 4


def test_status_shows_queue_depth_live_workers_and_counts(
    redis_url: str, start_worker, tmp_path: Path
) -> None:
    worker = start_worker(MODEL, "--weights", "none", "--device", "cpu")
    register_idle_model(redis_url, IDLE)
    images = [str(p) for p in write_images(tmp_path / "images", 3, width=64, height=64)]
    client = Client.from_url(redis_url)
    try:
        jobs = client.submit_many([*images, str(tmp_path / "missing.jpg")], model=MODEL)
        client.wait_many([j.id for j in jobs], 60)
        waiting = client.submit_many(["waiting.jpg"] * 3, model=IDLE)
        client.cancel(waiting[0].id)
    finally:
        client.close()

    out = _status(redis_url, "--json", "--interval", "0").stdout
    rows = {r["model"]: r for r in map(json.loads, out.splitlines())}
    table = _status(redis_url, "--interval", "0").stdout.splitlines()

    assert rows[MODEL]["workers"] == [worker.worker_id] and rows[MODEL]["live_workers"] == 1
    assert (rows[MODEL]["done"], rows[MODEL]["failed"], rows[MODEL]["queued"]) == (3, 1, 0)
    assert rows[MODEL]["oldest_age_s"] is None
    assert rows[IDLE]["live_workers"] == 0 and rows[IDLE]["queued"] == 1
    assert rows[IDLE]["oldest_age_s"] >= 0
    assert rows[IDLE]["jobs_per_s"] is None  # --interval 0 takes one sample only
    assert table[0].split() == HEADER
    idle_row = table[1].split()
    assert idle_row[:2] == [IDLE, "1"] and idle_row[3:] == ["0", "0", "0", "1", "0", "-"]
    assert table[2].split() == [MODEL, "0", "-", "1", "3", "1", "0", "0", "-"]
    assert (rows[IDLE]["cancelled"], rows[IDLE]["expired"]) == (1, 0)


def test_status_reports_recent_throughput_over_its_interval(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The two samples straddle --interval; jobs finishing in between give the rate."""
    register_idle_model(redis_url, IDLE)
    clock = _FakeClock(1000.0)
    counters = redis.Redis.from_url(redis_url)

    def finish_jobs_while_sleeping(seconds: float) -> None:
        counters.hincrby(keys.stats_key(IDLE), "done", 40)
        counters.hincrby(keys.stats_key(IDLE), "failed", 10)
        clock.now += seconds

    monkeypatch.setattr(status, "time", clock)
    monkeypatch.setattr("producer.cli.time.sleep", finish_jobs_while_sleeping)
    result = CliRunner().invoke(
        main, ["status", "--redis-url", redis_url, "--json", "--interval", "5"]
    )
    counters.close()

    assert result.exit_code == 0, result.output
    row = json.loads(result.output)
    assert (row["model"], row["done"], row["failed"], row["jobs_per_s"]) == (IDLE, 40, 10, 10.0)


def test_status_without_models_prints_only_the_header(redis_url: str) -> None:
    assert _status(redis_url, "--interval", "0").stdout.split() == HEADER


class _FakeClock:
    """Stands in for the ``time`` module inside producer.status."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


def test_queue_collector_exports_depth_and_age_for_scaling() -> None:
    fake = fakeredis.FakeRedis()
    job = Job(id="j1", uri="a.jpg", model=IDLE, top_k=5, submitted=0.0)
    JobStore(fake).create_many([job])
    version = registry.model_version("none", 1000)
    registry.register_model(fake, registry.ModelInfo(IDLE, "none", True, 1000))
    fake.lpush(keys.queue_name(IDLE, version, "low"), _celery_message(["j1", "j2"]))
    collector = gauges.QueueCollector(fake, lambda: [IDLE])

    samples = {m.name: m.samples[0] for m in collector.collect()}

    assert samples["imgcls_queue_depth"].value == 1
    assert samples["imgcls_queue_depth"].labels == {"model": IDLE}
    assert samples["imgcls_queue_oldest_age_seconds"].value > 1_000_000  # submitted at epoch 0


def _celery_message(job_ids: list[str]) -> bytes:
    """A queue message as Celery's protocol 2 writes it (base64 JSON body of [args, kw, embed])."""
    import base64

    body = base64.b64encode(json.dumps([[job_ids], {}, {}]).encode()).decode()
    return json.dumps({"body": body, "properties": {"body_encoding": "base64"}}).encode()
