"""What the fault and hostile-input tests share: a tiny model that is fast on two CPUs, an HTTP
image server the test scripts (hold a request, kill the worker), a supervisor that restarts dead
workers, and exact accounting of what became of every job.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TypeVar

import pytest
import redis
import torch
from PIL import Image
from torch import nn

from contract.job import Job
from contract.store import JobStore
from producer.client import Client
from tests.support import WorkerProcess, make_jpeg

MODEL = "tiny"
NUM_CLASSES = 10
# Seconds before a dead worker's messages go back to the queue: the smallest the worker allows.
# The fault tests hold image fetches on purpose until they release them; a loaded machine can take
# longer than the default 30 s deadline to get there.
HOLD_DEADLINE_S = 600
VISIBILITY_S = 5
# Longest any test waits for its jobs to settle; a hang fails the test instead of blocking CI.
SETTLE_S = 120
# Jobs per queue message (the producer's default chunk).
CHUNK = 64


class TinyNet(nn.Module):
    """Logits from the mean colour. An all-white image makes its own forward pass fail (an
    input the model cannot take); an all-black one breaks the "device" for good, as an illegal
    memory access corrupts a CUDA context, so every later forward pass fails too."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, NUM_CLASSES)
        self.broken = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x.amax(dim=(1, 2, 3)) < -1.5).any()):
            self.broken = True
        if self.broken:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if bool((x.amin(dim=(1, 2, 3)) > 2.0).any()):
            raise RuntimeError("the model cannot take an all-white image")
        return self.fc(x.mean(dim=(2, 3)))


def tiny_model_args(directory: Path) -> list[str]:
    """Worker flags serving TinyNet from a TorchScript file, on 32x32 inputs."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = directory / "tiny.pt"
    torch.jit.save(torch.jit.script(TinyNet().eval()), str(model))
    labels = directory / "labels.txt"
    labels.write_text("\n".join(f"class{i}" for i in range(NUM_CLASSES)))
    return [
        "--model-file", str(model), "--labels", str(labels), "--resize", "32", "--crop", "32",
        "--device", "cpu", "--batch-size", "256", "--visibility-timeout", str(VISIBILITY_S),
        "--fetch-deadline-s", str(HOLD_DEADLINE_S),
    ]  # fmt: skip


@pytest.fixture(name="model_args")
def model_args_fixture(tmp_path: Path, images: list[Path]) -> list[str]:
    """Worker flags for the fault tests: TinyNet, the test's ``images`` fixture's directory,
    and the loopback image server."""
    return [
        *tiny_model_args(tmp_path / "model"),
        "--allowed-root", str(images[0].parent), "--http-allow-network", "127.0.0.0/8",
    ]  # fmt: skip


@pytest.fixture(name="producer")
def producer_fixture(redis_url: str) -> Iterator[Client]:
    """A producer client on the test's Redis, closed after the test."""
    client = Client.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(name="server")
def server_fixture() -> Iterator[ImageServer]:
    """The loopback image server, closed after the test."""
    with ImageServer() as server:
        yield server


def small_jpeg(seed: int = 0) -> bytes:
    return make_jpeg(48, 48, seed=seed)


def plain_jpeg(colour: tuple[int, int, int]) -> bytes:
    """A 48x48 JPEG of one colour: white and black ones trip TinyNet."""
    out = io.BytesIO()
    Image.new("RGB", (48, 48), colour).save(out, format="JPEG", quality=100)
    return out.getvalue()


# -- a scriptable HTTP image server ---------------------------------------------------------


class LoopbackServer:
    """A ``ThreadingHTTPServer`` on 127.0.0.1, served from a daemon thread while the ``with``
    block runs; leaving the block sets ``released`` (freeing any held request) and closes it."""

    released: threading.Event
    _server: ThreadingHTTPServer

    def __enter__(self: _Server) -> _Server:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.released.set()
        self._server.shutdown()
        self._server.server_close()


_Server = TypeVar("_Server", bound=LoopbackServer)


class ImageServer(LoopbackServer):
    """Serves small JPEGs on 127.0.0.1. ``/img/N`` answers at once. ``/hold/N`` sends its
    body a byte at a time (so no read timeout fires) until ``release()``. ``/poison`` calls
    ``on_poison`` (e.g. SIGKILL the worker) before answering. Requests are counted by kind."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.on_poison: Callable[[], None] = lambda: None
        self._arrivals: dict[str, int] = {}
        self._lock = threading.Condition()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def release(self) -> None:
        self.released.set()

    def arrived(self, kind: str) -> int:
        with self._lock:
            return self._arrivals.get(kind, 0)

    def wait_arrivals(self, kind: str, count: int, timeout: float = SETTLE_S) -> None:
        with self._lock:
            if not self._lock.wait_for(lambda: self._arrivals.get(kind, 0) >= count, timeout):
                raise TimeoutError(f"{self._arrivals.get(kind, 0)} of {count} {kind} requests")

    def note(self, kind: str) -> None:
        with self._lock:
            self._arrivals[kind] = self._arrivals.get(kind, 0) + 1
            self._lock.notify_all()


def _handler(server: ImageServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            kind, _, name = self.path.strip("/").partition("/")
            server.note(kind)
            if kind == "poison":
                server.on_poison()
            body = small_jpeg(seed=sum(name.encode()))
            self.send_response(200 if kind in ("img", "hold", "poison") else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(OSError):  # the worker may die mid-answer
                self._send(body, trickle=kind == "hold")

        def _send(self, body: bytes, trickle: bool) -> None:
            sent = 0
            while trickle and not server.released.wait(0.2) and sent < len(body) - 1:
                self.wfile.write(body[sent : sent + 1])
                self.wfile.flush()
                sent += 1
            self.wfile.write(body[sent:])

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


# -- workers that die -----------------------------------------------------------------------


class Supervisor:
    """Starts a new worker whenever the current one dies, as systemd or Kubernetes would."""

    def __init__(self, start: Callable[[], WorkerProcess]) -> None:
        self._start = start
        self.current = start()
        self.exit_codes: list[int] = []
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> Supervisor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped.set()
        self._thread.join()

    def kill_current(self) -> None:
        os.kill(self.current.pid, signal.SIGKILL)

    def _watch(self) -> None:
        while not self._stopped.wait(0.05):
            code = self.current.proc.poll() if self.current.proc is not None else None
            if code is not None:
                self.exit_codes.append(code)
                self.current = self._start()


class Workers:
    """Worker processes on any Redis URL (``start_worker`` is bound to the tests' own Redis);
    each is stopped on exit."""

    def __init__(self, url: str, workdir: Path, torch_home: str, args: Sequence[str]) -> None:
        self.url = url
        self.workdir = workdir
        self.env = {"TORCH_HOME": torch_home}
        self.args = list(args)
        self.started: list[WorkerProcess] = []

    def start(self, *extra: str, wait: bool = True) -> WorkerProcess:
        worker = WorkerProcess(self.url, MODEL, [*self.args, *extra], self.workdir, env=self.env)
        self.started.append(worker)
        return worker.start(wait=wait, timeout=SETTLE_S)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        for worker in self.started:
            worker.stop()


# -- accounting -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Accounting:
    """What became of every submitted job, from the records and the model's stats counters."""

    test: str
    submitted: int
    done: int
    failed: int
    # Results computed for a job that already had one, and discarded (stats ``duplicate``).
    executed_twice: int
    # Jobs started more than once (``attempts`` > 1): their first worker died holding them.
    redelivered: int
    # What the stats hash counted as written; equal to done/failed when each was written once.
    written_done: int
    written_failed: int

    @property
    def lost(self) -> int:
        return self.submitted - self.done - self.failed

    def line(self) -> str:
        return (
            f"FAULT-ACCOUNTING test={self.test} submitted={self.submitted} done={self.done} "
            f"failed={self.failed} executed_twice={self.executed_twice} "
            f"redelivered={self.redelivered} lost={self.lost}"
        )


def account(test: str, client: redis.Redis, records: Sequence[Job | None]) -> Accounting:
    """Count ``records`` (one per submitted job) and print the summary line."""
    stats = JobStore(client).stats(records[0].model if records[0] else MODEL)
    jobs = [r for r in records if r is not None]
    result = Accounting(
        test=test,
        submitted=len(records),
        done=sum(j.status == "done" for j in jobs),
        failed=sum(j.status == "failed" for j in jobs),
        executed_twice=stats.get("duplicate", 0),
        redelivered=sum(j.attempts > 1 for j in jobs),
        written_done=stats.get("done", 0),
        written_failed=stats.get("failed", 0),
    )
    print(result.line())
    return result


def settle(producer: Client, ids: Sequence[str], timeout: float = SETTLE_S) -> list[Job | None]:
    """The records once every job is final, or as they are after ``timeout``."""
    return producer.wait_many(ids, timeout)


def held_layout(server: ImageServer, images: Sequence[Path], messages: int) -> list[str]:
    """URIs for ``messages`` full queue messages, each opening with one held HTTP job and
    going on with local images: a worker that takes a message is stuck inside it, with the
    rest of its jobs done, until the server releases the hold."""
    uris = []
    for m in range(messages):
        uris.append(f"{server.base}/hold/{m}")
        uris += [str(images[(m * CHUNK + n) % len(images)]) for n in range(CHUNK - 1)]
    return uris


def stuck_in_flight(server: ImageServer, producer: Client, ids: Sequence[str], held: int) -> None:
    """Wait until workers hold ``held`` messages of a ``held_layout``: the held job of each
    running, the rest of each message done."""
    server.wait_arrivals("hold", held)
    done = held * (CHUNK - 1)
    wait_until(lambda: statuses(producer, ids).get("done", 0) >= done, f"{done} jobs done")


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = SETTLE_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"still waiting for {what} after {timeout} s")
        time.sleep(0.05)


def outcome(job: Job | None) -> str:
    """``done``, the error type of a failed job, or the status of one not final."""
    if job is None:
        return "missing"
    return job.error.type if job.error is not None else job.status


def statuses(producer: Client, ids: Sequence[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for job in producer.get_many(ids):
        status = job.status if job else "missing"
        found[status] = found.get(status, 0) + 1
    return found
