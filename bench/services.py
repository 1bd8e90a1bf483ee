"""The worker pools an end-to-end run needs, on the private Redis of ``demo.stack``.

Every process is a child of the benchmark and dies with it, so a run killed by a timeout leaves
no worker holding a GPU or a port.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import redis

from demo.stack import RedisServer, WorkerProcess, free_port

__all__ = ["RedisServer", "WorkerPool"]


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
        module: str = "worker",
    ) -> None:
        self.redis_url = redis_url
        self.module = module
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
        self.workers.extend(w.start(wait=False) for w in new)
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
        # One process per worker unless the caller's args ask otherwise (the last one wins),
        # so a pool of N workers is N processes.
        args = ["--processes", "1", *self.args, "--device", device]
        worker_id = f"bench-{self.model}-{index}-{os.getpid()}"
        return WorkerProcess(
            self.redis_url,
            self.model,
            args,
            self.log_dir,
            self.env,
            worker_id,
            metrics_port=free_port(),
            module=self.module,
        )

    def pids(self) -> dict[str, int]:
        return {f"worker-{i}": w.proc.pid for i, w in enumerate(self.workers) if w.proc is not None}

    def metrics_ports(self) -> list[int]:
        return [w.metrics_port for w in self.workers if w.metrics_port is not None]

    def stop(self, graceful: bool = True) -> None:
        for w in self.workers:
            if w.proc is None or w.proc.poll() is not None:
                continue
            if graceful:
                w.signal_stop()  # all at once, then each waited for
            else:
                w.proc.send_signal(signal.SIGKILL)
        for w in self.workers:
            w.stop()
        self.workers = []
