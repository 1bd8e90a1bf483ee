"""Where a message's jobs are loaded: local files on the host threads, handed to the pipeline many
at a time; everything that waits on the network on the I/O threads, handed over one by
one."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from contract.job import Job
from worker import service as service_module
from worker.pipeline import WorkItem
from worker.service import Service
from worker.settings import HOST_HANDOVER

URIS = ["/data/a.jpg", "s3://bucket/b.jpg", "file:///data/c.jpg", "https://example.test/d.jpg"]


class Recorder:
    """Stands in for the pipeline: records each hand-over, and which thread loaded each job."""

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch
        self.handovers: list[list[str]] = []
        self.loaded_on: dict[str, str] = {}
        self.lock = threading.Lock()
        self.done = threading.Semaphore(0)

    def expect(self, count: int) -> None:
        pass

    def submit_many(self, items: list[WorkItem]) -> None:
        with self.lock:
            self.handovers.append([i.job.uri for i in items])
        for _ in items:
            self.done.release()

    def load_image(self, item: WorkItem) -> None:
        self.loaded_on[item.job.uri] = threading.current_thread().name


def _service(recorder: Recorder, host_threads: int) -> Service:
    service = Service.__new__(Service)
    service.pipeline = recorder  # type: ignore[assignment]
    service.metrics = SimpleNamespace(stage=lambda *_: None)  # type: ignore[assignment]
    service.io_pool = ThreadPoolExecutor(4, thread_name_prefix="io")
    service.io_threads = 4
    service.host_threads = host_threads
    service.host_pool = ThreadPoolExecutor(host_threads, thread_name_prefix="host")
    service.load_image = recorder.load_image  # type: ignore[method-assign]
    return service


def _start(service: Service, recorder: Recorder, uris: list[str]) -> None:
    service._start([Job(id=f"j{n}", uri=uri, model="m", top_k=5) for n, uri in enumerate(uris)])
    for _ in uris:
        assert recorder.done.acquire(timeout=30)


def test_local_files_load_on_the_host_threads_and_the_rest_on_the_io_threads() -> None:
    recorder = Recorder(max_batch=8)
    _start(_service(recorder, host_threads=1), recorder, URIS)
    on = {uri: name.split("_")[0] for uri, name in recorder.loaded_on.items()}
    assert on == {URIS[0]: "host", URIS[1]: "io", URIS[2]: "host", URIS[3]: "io"}


@pytest.fixture
def patient(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hand-over wait no test lives to see: hand-overs are cut by their size alone."""
    monkeypatch.setattr(service_module, "HANDOVER_WAIT_S", 3600.0)


def test_the_host_thread_hands_local_jobs_over_up_to_host_handover_at_a_time(patient) -> None:
    recorder = Recorder(max_batch=8)
    cut = HOST_HANDOVER
    uris = [f"/data/{n}.jpg" for n in range(2 * cut + 2)]
    _start(_service(recorder, host_threads=1), recorder, uris)
    assert recorder.handovers == [uris[:cut], uris[cut : 2 * cut], uris[2 * cut :]]


def test_loaded_jobs_are_handed_over_with_the_first_load_that_ends_after_the_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(service_module, "HANDOVER_WAIT_S", 0.01)
    recorder = Recorder(max_batch=8)
    load = recorder.load_image

    def slow(item: WorkItem) -> None:  # each load takes longer than the wait
        time.sleep(0.02)
        load(item)

    uris = [f"/data/{n}.jpg" for n in range(6)]
    service = _service(recorder, host_threads=1)
    service.load_image = slow  # type: ignore[method-assign]
    _start(service, recorder, uris)
    assert recorder.handovers == [uris[0:2], uris[2:4], uris[4:6]]
