"""A real gateway process for the HTTP tests: ``python -m producer serve`` on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from contract import registry
from contract.registry import ModelInfo
from tests.support import ROOT, free_port


class GatewayProcess:
    """The gateway as an operator starts it, on a free 127.0.0.1 port."""

    def __init__(
        self,
        redis_url: str,
        workdir: Path,
        token: str | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.port = free_port()
        self.args = ["--redis-url", redis_url, "--host", "127.0.0.1", "--port", str(self.port)]
        self.args += list(args)
        self.env = {"IMGCLS_API_TOKEN": token} if token else {}
        self.log_path = workdir / f"gateway-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> GatewayProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT), **self.env}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "producer", "serve", *self.args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_listening(timeout)
        return self

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.url}/openapi.json", timeout=2)
                return
            except httpx.TransportError:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"gateway exited:\n{self.log()}") from None
                time.sleep(0.05)
        raise TimeoutError(f"gateway not listening after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def register_idle_model(redis_url: str, name: str) -> None:
    """Declare a model as its worker would, with no worker taking its queue: jobs stay queued."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        registry.register_model(client, ModelInfo(name, "none", True, 1000, "cpu"))
    finally:
        client.close()
