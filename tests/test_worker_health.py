"""The worker's /metrics, /healthz and /readyz: unit tests on the server, then a real worker."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import fakeredis
import httpx
import pytest
import redis
from celery import signals
from prometheus_client.parser import text_string_to_metric_families

from contract import registry
from producer.client import Client
from tests.support import RedisServer, WorkerProcess, free_port, write_images
from worker.health import HealthServer
from worker.metrics import Metrics

MODEL = "mobilenet_v3_small"


@pytest.fixture
def server() -> Iterator[HealthServer]:
    server = HealthServer("127.0.0.1", 0).start()
    yield server
    server.close()


def _get(server: HealthServer, path: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{server.port}{path}", timeout=10)


def _fake_runtime(threads: list[threading.Thread]) -> SimpleNamespace:
    return SimpleNamespace(
        settings=SimpleNamespace(model="m"),
        redis=fakeredis.FakeRedis(),
        metrics=Metrics("m"),
        info=SimpleNamespace(device="cpu"),
        pipeline=SimpleNamespace(dead_stages=lambda: [t.name for t in threads if not t.is_alive()]),
        service=SimpleNamespace(store=None),  # job records on ``redis``
    )


def _parked_thread(stop: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    return thread


def test_while_the_model_loads_the_worker_is_live_but_not_ready(server: HealthServer) -> None:
    assert _get(server, "/healthz").status_code == 200
    assert _get(server, "/readyz").status_code == 503
    assert _get(server, "/metrics").status_code == 200
    assert _get(server, "/elsewhere").status_code == 404


def test_ready_only_once_warm_and_consuming_and_not_while_shutting_down(
    server: HealthServer,
) -> None:
    stop = threading.Event()
    server.attach(_fake_runtime([_parked_thread(stop)]))
    warm_not_consuming = _get(server, "/readyz")
    signals.worker_ready.send(sender=None)
    consuming = _get(server, "/readyz")
    signals.worker_shutting_down.send(sender="test", sig="TERM", how="Warm", exitcode=0)
    draining = _get(server, "/readyz")
    stop.set()

    assert warm_not_consuming.status_code == 503
    assert consuming.status_code == 200
    assert draining.status_code == 503


def test_a_closed_health_server_no_longer_hears_celery_signals() -> None:
    server = HealthServer("127.0.0.1", 0).start()
    server.attach(_fake_runtime([]))
    server.close()

    signals.worker_ready.send(sender=None)

    assert server.health.consuming is False


def test_liveness_fails_when_a_pipeline_thread_dies(server: HealthServer) -> None:
    stop = threading.Event()
    alive, dying = _parked_thread(threading.Event()), _parked_thread(stop)
    server.attach(_fake_runtime([alive, dying]))
    before = _get(server, "/healthz")
    stop.set()
    dying.join()

    after = _get(server, "/healthz")

    assert before.status_code == 200
    assert after.status_code == 503 and dying.name in after.text


def test_metrics_have_no_device_memory_sample_on_a_cpu(server: HealthServer) -> None:
    server.attach(_fake_runtime([]))

    names = {s.name for f in _families(_get(server, "/metrics").text) for s in f.samples}

    assert "imgcls_queue_depth" in names
    assert "imgcls_device_memory_bytes" not in names


def _families(text: str) -> list:
    return list(text_string_to_metric_families(text))


def _samples(text: str, name: str) -> list:
    return [s for f in _families(text) for s in f.samples if s.name == name]


# -- a real worker ------------------------------------------------------------------------


def test_a_real_worker_exports_jobs_stages_batches_and_queue_gauges(
    start_worker, redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    worker = start_worker(MODEL, "--weights", "none", "--device", "cpu", *_metrics_args(port))
    images = [str(p) for p in write_images(tmp_path / "images", 4, width=64, height=64)]
    client = Client.from_url(redis_url)
    try:
        jobs = client.submit_many([*images, str(tmp_path / "missing.jpg")], model=MODEL)
        client.wait_many([j.id for j in jobs], 60)
    finally:
        client.close()

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text

    jobs_by_outcome = {
        (s.labels["status"], s.labels["error_type"]): s.value
        for s in _samples(text, "imgcls_jobs_total")
    }
    assert jobs_by_outcome == {("done", ""): 4.0, ("failed", "not_found"): 1.0}
    stages = {s.labels["stage"] for s in _samples(text, "imgcls_stage_seconds_count")}
    assert stages == {"queue_wait", "fetch", "decode", "device_preprocess", "inference", "store"}
    assert sum(s.value for s in _samples(text, "imgcls_batch_size_sum")) == 4
    assert [s.value for s in _samples(text, "imgcls_queue_depth")] == [0]
    assert [s.value for s in _samples(text, "imgcls_queue_oldest_age_seconds")] == [0]
    assert _samples(text, "imgcls_device_memory_bytes") == []  # a CPU worker
    assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
    assert worker.proc is not None and worker.proc.poll() is None


def test_a_warm_worker_is_not_ready_until_its_consumer_runs(
    tmp_path: Path, torch_home: str
) -> None:
    """Writes to a private Redis are paused, so the worker warms its model but cannot
    register it or start consuming: ready must wait for that."""
    server = RedisServer(tmp_path)
    server.start()
    port = free_port()
    worker = WorkerProcess(
        server.url,
        MODEL,
        ["--weights", "none", "--device", "cpu", *_metrics_args(port)],
        tmp_path,
        env={"TORCH_HOME": torch_home},
    )
    admin = redis.Redis.from_url(server.url)
    try:
        admin.execute_command("CLIENT", "PAUSE", 120_000, "WRITE")
        worker.start(wait=False)
        _wait_for(lambda: "warm on" in worker.log(), worker)
        warm = [_status(port, "/healthz"), _status(port, "/readyz")]
        registered = list(registry.live_workers(admin, MODEL))
        admin.execute_command("CLIENT", "UNPAUSE")
        _wait_for(lambda: _status(port, "/readyz") == 200, worker)

        assert warm == [200, 503]
        assert registered == []
        assert registry.get_model(admin, MODEL) is not None  # registered once writes resumed
        assert worker.terminate(timeout=60) == 0
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        admin.close()
        worker.stop()
        server.stop()


def _metrics_args(port: int) -> list[str]:
    return ["--metrics-port", str(port), "--metrics-host", "127.0.0.1"]


def _status(port: int, path: str) -> int | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5).status_code
    except httpx.TransportError:
        return None


def _wait_for(condition, worker: WorkerProcess, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if worker.proc is not None and worker.proc.poll() is not None:
            raise AssertionError(f"worker exited:\n{worker.log()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout} s:\n{worker.log()}")
        time.sleep(0.05)
