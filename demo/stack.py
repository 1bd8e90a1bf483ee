"""A private redis-server and real worker processes on this machine: for the demo, the
benchmark and the tests. Nothing here touches a Redis it did not start."""

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
from contract.connection import connect

ROOT = Path(__file__).resolve().parent.parent
# Linux prctl option that sends the child a signal when its parent exits.
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Runs in the child before exec, so a parent killed by a timeout leaves no server or worker
    behind holding a port or a GPU. The signal follows the thread that forked: spawn from the
    main thread."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class RedisServer:
    """A private redis-server on a free loopback port; never the shared one on 6379."""

    def __init__(
        self,
        workdir: Path,
        appendonly: bool = False,
        port: int | None = None,
        password: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.appendonly = appendonly
        self.port = port or free_port()
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.db_url(0)

    def db_url(self, db: int) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def start(self, *extra: str) -> RedisServer:
        """Start the server; ``extra`` are more redis-server options (TLS ports, say)."""
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed: apt-get install redis-server")
        args = [
            exe,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
            *(("--requirepass", self.password) if self.password else ()),
            *extra,
        ]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
        self._wait_for_ping()
        return self

    def _wait_for_ping(self, timeout: float = 10) -> None:
        client = redis.Redis(port=self.port, password=self.password)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    client.ping()
                    return
                except (redis.ConnectionError, redis.BusyLoadingError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        self.proc.wait(timeout=10)
        self.proc = None


class WorkerProcess:
    """``python -m worker`` in its own process, exactly as an operator starts it."""

    def __init__(
        self,
        redis_url: str,
        model: str,
        args: Sequence[str],
        workdir: Path,
        env: dict[str, str] | None = None,
        worker_id: str | None = None,
        *,
        metrics_port: int | None = None,
        module: str = "worker",
    ) -> None:
        self.redis_url = redis_url
        # The module run with ``python -m``: the worker, or a bench wrapper of it.
        self.module = module
        self.model = model
        self.metrics_port = metrics_port
        self.worker_id = worker_id or f"local-{os.urandom(3).hex()}"
        metrics = ["--metrics-port", str(metrics_port)] if metrics_port else []
        self.args = [
            *("--model", model, "--redis-url", redis_url, "--worker-id", self.worker_id),
            *metrics,
            *args,
        ]
        self.workdir = workdir
        self.env = env or {}
        self.log_path = workdir / f"worker-{self.worker_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._told_to_stop = False

    def start(self, wait: bool = True, timeout: float = 120) -> WorkerProcess:
        env = {**os.environ, **self.env}
        # The project first, then whatever the caller's path holds (the GPU kit's packages).
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args],
                cwd=self.workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        self._told_to_stop = False
        if wait:
            self.wait_ready(timeout)
        return self

    def ready(self, client: redis.Redis) -> bool:
        """Ready means the model is warm: the worker's heartbeat key exists."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
        return any(self.worker_id in k for k in registry.live_workers(client, self.model))

    def wait_ready(self, timeout: float) -> None:
        client = connect(self.redis_url)
        deadline = time.monotonic() + timeout
        try:
            while not self.ready(client):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker not ready after {timeout} s:\n{self.log_tail()}")
                time.sleep(0.1)
        finally:
            client.close()

    def log_tail(self, chars: int = 4000) -> str:
        return self.log()[-chars:]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as when the kernel's OOM killer strikes."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM: Celery's warm shutdown."""
        self.signal_stop()
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def signal_stop(self) -> None:
        """Send SIGTERM once: a second one, arriving while Celery's handler runs, can deadlock
        the worker in that handler."""
        assert self.proc is not None
        if self.proc.poll() is None and not self._told_to_stop:
            self._told_to_stop = True
            self.proc.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.terminate(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
