"""Ordered, bounded shutdown: feeders stop before what they feed, no join waits forever, and a
worker stopped with jobs in flight exits within its grace period having lost none."""

from __future__ import annotations

import re
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import fakeredis
import pytest

from contract import registry
from contract.shards import ShardedStore
from demo.stack import free_port
from producer.client import Client
from tests.faults_support import (
    CHUNK,
    MODEL,
    ImageServer,
    account,
    held_layout,
    model_args_fixture,  # noqa: F401 (the model_args fixture, shared by the fault tests)
    producer_fixture,  # noqa: F401 (the producer fixture, shared by the fault tests)
    server_fixture,  # noqa: F401 (the server fixture, shared by the fault tests)
    settle,
    statuses,
    stuck_in_flight,
)
from tests.support import ROOT, write_images
from worker.app import Runtime
from worker.settings import Settings

_MESSAGES = 8
_CONCURRENCY = 4


def _grace_period_s() -> int:
    """The seconds the deploy files give a worker between SIGTERM and SIGKILL."""
    text = (ROOT / "deploy" / "k8s" / "worker.yaml").read_text()
    return int(re.search(r"terminationGracePeriodSeconds: (\d+)", text).group(1))


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    return write_images(tmp_path / "images", 64, width=48, height=48)


class FedPipeline:
    """Stands in for the pipeline: notes whether its feeder had finished when it was closed."""

    def __init__(self, fed: threading.Event) -> None:
        self.fed = fed
        self.fed_before_close: bool | None = None

    def close(self, timeout_s: float) -> bool:
        self.fed_before_close = self.fed.is_set()
        return True


def test_runtime_close_drains_the_io_pool_before_it_closes_the_pipeline() -> None:
    release, fed = threading.Event(), threading.Event()
    io_pool = ThreadPoolExecutor(1)
    io_pool.submit(lambda: (release.wait(30), fed.set()))
    pipeline = FedPipeline(fed)
    client = fakeredis.FakeRedis()
    service = SimpleNamespace(store=ShardedStore([client]))  # what close() touches of it
    runtime = Runtime(
        Settings(model="m", worker_id="w"), client, service, pipeline, io_pool,
        None, None, None,
    )  # type: ignore[arg-type]  # fmt: skip
    closer = threading.Thread(target=runtime.close)
    closer.start()
    closer.join(0.5)  # an unordered close would have closed the pipeline by now
    release.set()
    closer.join(30)

    assert pipeline.fed_before_close is True


@pytest.mark.slow
def test_a_worker_stopped_with_jobs_in_flight_exits_within_its_grace_period_losing_none(
    start_worker, model_args, producer: Client, server: ImageServer, images, redis_client
) -> None:
    args = [*model_args, "--concurrency", str(_CONCURRENCY), "--metrics-port", str(free_port())]
    worker = start_worker(MODEL, *args)
    ids = [j.id for j in producer.submit_many(held_layout(server, images, _MESSAGES), model=MODEL)]
    stuck_in_flight(server, producer, ids, _CONCURRENCY)

    worker.proc.send_signal(signal.SIGTERM)
    server.release()
    assert worker.wait_exit(_grace_period_s()) == 0, worker.log()

    assert "not waiting for them" not in worker.log()  # every thread and pool stopped in time
    assert not any(worker.worker_id in k for k in registry.live_workers(redis_client, MODEL))
    left = statuses(producer, ids)
    assert "running" not in left, left
    assert left["done"] >= _CONCURRENCY * CHUNK
    start_worker(MODEL, *model_args)
    tally = account("stopped-in-flight", redis_client, settle(producer, ids))
    assert (tally.done, tally.failed, tally.lost) == (len(ids), 0, 0)
    assert (tally.executed_twice, tally.redelivered) == (0, 0)
