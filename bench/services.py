"""The real services an end-to-end run needs: a private redis-server and worker processes.

Both are children of the benchmark and die with it (SIGTERM on the parent's death), so a run
killed by a timeout leaves no worker holding a GPU or a port.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import redis

from contract import registry

ROOT = Path(__file__).resolve().parent.parent
# Linux prctl option that sends the child a signal when its parent exits.
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Runs in the child before exec. Needs the parent's main thread to do the spawning: the
    signal follows the thread that forked, not the process."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class RedisServer:
    """A private redis-server on a free loopback port; never a shared one."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError(
                "redis-server is not on PATH: apt-get install redis-server, or on the GPU "
                "machine source .devkit/setup.sh first"
            )
        args = [exe, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.workdir)]
        args += ["--save", "", "--appendonly", "no", "--protected-mode", "yes"]
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        self._wait_ping()
        return self

    def _wait_ping(self, timeout: float = 10) -> None:
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


class WorkerProcess:
    """``python -m worker`` in its own process, as an operator starts it (``entry`` names another
    module that runs the same CLI, such as ``bench.worker_entry``)."""

    def __init__(
        self,
        redis_url: str,
        model: str,
        args: Sequence[str],
        log_dir: Path,
        env: dict[str, str],
        worker_id: str,
        entry: str = "worker",
    ) -> None:
        self.redis_url = redis_url
        self.entry = entry
        self.metrics_port = free_port()
        self.model = model
        self.worker_id = worker_id
        self.args = [
            *("--model", model, "--redis-url", redis_url, "--worker-id", worker_id),
            *("--metrics-port", str(self.metrics_port)),
            *args,
        ]
        self.env = env
        self.log_path = log_dir / f"worker-{worker_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.entry, *self.args],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        return self

    def ready(self, client: redis.Redis) -> bool:
        """Ready means the model is warm: the worker's heartbeat key exists."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"worker {self.worker_id} exited with {self.proc.returncode}:\n{self.log_tail()}"
            )
        return any(self.worker_id in k for k in registry.live_workers(client, self.model))

    def log_tail(self, chars: int = 4000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-chars:]

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (Celery's warm shutdown), then SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


class WorkerPool:
    """Worker processes serving one model; grows to the count asked for, starting in parallel."""

    def __init__(
        self,
        redis_url: str,
        model: str,
        args: Sequence[str],
        log_dir: Path,
        env: dict[str, str],
        devices: Sequence[str],
        entry: str = "worker",
    ) -> None:
        self.redis_url = redis_url
        self.entry = entry
        self.model = model
        self.args = list(args)
        self.log_dir = log_dir
        self.env = env
        self.devices = list(devices)
        self.workers: list[WorkerProcess] = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        """A run cut short (a timeout's SIGTERM) kills at once: a warm shutdown finishes the
        messages in hand first, and the next run should not share the GPU with them."""
        self.stop(graceful=exc_type is None)

    def ensure(self, count: int, timeout: float) -> None:
        """Start workers until ``count`` run, each on the next device, and wait for all."""
        new = [self._worker(len(self.workers) + i) for i in range(count - len(self.workers))]
        self.workers.extend(w.start() for w in new)
        client = redis.Redis.from_url(self.redis_url)
        deadline = time.monotonic() + timeout
        try:
            while not all(w.ready(client) for w in self.workers):
                if time.monotonic() > deadline:
                    tails = "\n".join(w.log_tail() for w in self.workers)
                    raise TimeoutError(f"workers not ready after {timeout} s:\n{tails}")
                time.sleep(0.2)
        finally:
            client.close()

    def _worker(self, index: int) -> WorkerProcess:
        device = self.devices[index % len(self.devices)]
        args = [*self.args, "--device", device]  # a repeated click option: the last one wins
        worker_id = f"bench-{self.model}-{index}-{os.getpid()}"
        return WorkerProcess(
            self.redis_url, self.model, args, self.log_dir, self.env, worker_id, self.entry
        )

    def pids(self) -> dict[str, int]:
        return {f"worker-{i}": w.proc.pid for i, w in enumerate(self.workers) if w.proc}

    def metrics_ports(self) -> list[int]:
        return [w.metrics_port for w in self.workers]

    def stop(self, graceful: bool = True) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
        for w in self.workers:
            w.stop()
        self.workers = []
