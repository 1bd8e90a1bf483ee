"""Helpers the integration tests share: real worker processes and generated images."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import redis
from PIL import Image

from contract import registry

ROOT = Path(__file__).resolve().parent.parent


def make_jpeg(width: int = 500, height: int = 375, seed: int = 0, quality: int = 90) -> bytes:
    """A photo-like JPEG: smooth gradients plus a few shapes, different for each seed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy = rng.uniform(0.002, 0.03, 2).tolist()
        phase = rng.uniform(0, 6.28)
        channels.append(127 + 120 * np.sin(x * fx + y * fy + phase))
    pixels = np.stack(channels, axis=-1)
    for _ in range(4):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(10, 80)
        mask = (x - cx) ** 2 + (y - cy) ** 2 < r**2
        pixels[mask] = rng.integers(0, 255, 3)
    image = Image.fromarray(pixels.clip(0, 255).astype("uint8"))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def write_images(directory: Path, count: int, **kwargs: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = directory / f"img{i:05d}.jpg"
        path.write_bytes(make_jpeg(seed=i, **kwargs))
        paths.append(path)
    return paths


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
    ) -> None:
        self.redis_url = redis_url
        self.model = model
        self.worker_id = worker_id or f"test-{os.urandom(3).hex()}"
        self.args = [
            "--model",
            model,
            "--redis-url",
            redis_url,
            "--worker-id",
            self.worker_id,
            *args,
        ]
        self.workdir = workdir
        self.env = env or {}
        self.log_path = workdir / f"worker-{self.worker_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True, timeout: float = 120) -> WorkerProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **self.env}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", *self.args],
            cwd=self.workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        """Ready means the model is warm: the worker's heartbeat key exists."""
        client = redis.Redis.from_url(self.redis_url)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if any(self.worker_id in k for k in registry.live_workers(client, self.model)):
                    return
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
                time.sleep(0.1)
        finally:
            client.close()
        raise TimeoutError(f"worker not ready after {timeout} s:\n{self.log()}")

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
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

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
