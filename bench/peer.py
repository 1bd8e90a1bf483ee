"""The peer comparison of issue 10: LitServe and this service, same model, images and machine.

mobilenet_v3_large (random weights, fp32, CPU) with torchvision's preprocessing from
``MobileNet_V3_Large_Weights.DEFAULT.transforms()`` (no download) on the same ImageNet-size
JPEGs, read by path. LitServe runs on loopback (batches of up to 8, 5 ms wait, like the worker's
CPU defaults), fed by concurrent HTTP clients; this service runs through a private Redis and
real workers, fed by ``submit_many``. Each layout: a warm-up pass, then the best of ``repeat``.

``python -m bench.peer [--quick]``; LitServe is the ``bench`` extra (``pip install litserve``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litserve as ls
import torch
import torchvision
from PIL import Image

from bench.e2e import run_e2e
from bench.images import IMAGENET, image_pool
from bench.services import RedisServer, WorkerPool
from contract import registry
from demo.stack import ROOT, free_port
from producer.client import Client
from worker import supervisor

MODEL = "mobilenet_v3_large"
# Images per pass, as in the measurement.
IMAGES = 384
# LitServe's batching, matched to the worker's CPU defaults (batch 8, 5 ms).
MAX_BATCH = 8
BATCH_TIMEOUT_S = 0.005
# HTTP requests in flight: enough to keep every LitServe worker's batches full.
CLIENTS = 16
# Seconds LitServe may take to start its workers and load the model.
READY_TIMEOUT_S = 120


@dataclass(frozen=True)
class Layout:
    """One configuration measured: who serves, how many processes, torch threads each."""

    server: str  # "litserve" or "imgcls"
    workers: int
    threads: int | None  # None: torch's default (imgcls: what --processes chooses)
    processes: str = "1"  # imgcls: each worker's --processes ("auto" is the default)

    @property
    def name(self) -> str:
        if self.server == "imgcls":
            return f"imgcls, --processes {self.processes}" + (
                " (the default)" if self.processes == "auto" else ""
            )
        threads = "default threads" if self.threads is None else f"{self.threads} thread(s) each"
        return f"{self.server}, {self.workers} worker(s), {threads}"

    def env(self) -> dict[str, str]:
        return {} if self.threads is None else {"OMP_NUM_THREADS": str(self.threads)}


LAYOUTS = (
    Layout("imgcls", 1, None, "1"),
    Layout("imgcls", 1, None, "auto"),
    Layout("litserve", 1, None),
    Layout("litserve", 2, 1),
)


class MobileNetAPI(ls.LitAPI):
    """Decode and preprocess by path, batch, forward, top-5. At module level: LitServe's
    workers are spawned, and spawn pickles the API by reference."""

    def setup(self, device: str) -> None:
        torch.set_flush_denormal(True)  # as the worker does: random weights make denormals
        self.transform = torchvision.models.MobileNet_V3_Large_Weights.DEFAULT.transforms()
        self.model = torchvision.models.mobilenet_v3_large(weights=None).eval()

    def decode_request(self, request: dict[str, str]) -> torch.Tensor:
        with Image.open(request["path"]) as image:
            return self.transform(image.convert("RGB"))

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, x: torch.Tensor) -> list[list[int]]:
        torch.set_flush_denormal(True)  # per thread: LitServe may predict off setup's thread
        with torch.inference_mode():
            return self.model(x).softmax(-1).topk(5).indices.tolist()

    def unbatch(self, output: list[list[int]]) -> list[list[int]]:
        return output

    def encode_response(self, output: list[int]) -> dict[str, list[int]]:
        return {"top5": output}


def serve(port: int, workers: int) -> None:
    """The LitServe server process (``python -m bench.peer --serve PORT --workers N``)."""
    api = MobileNetAPI(max_batch_size=MAX_BATCH, batch_timeout=BATCH_TIMEOUT_S)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=workers)
    server.run(host="127.0.0.1", port=port, generate_client_file=False, log_level="warning")


class LitServeProcess:
    def __init__(self, layout: Layout, log_path: Path) -> None:
        self.port = free_port()
        env = {**os.environ, **layout.env(), "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "bench.peer", "--serve", str(self.port)]
        cmd += ["--workers", str(layout.workers)]
        with log_path.open("ab") as log:
            # A session of its own: LitServe's worker processes are stopped with it (they
            # outlived a SIGTERM to the server alone, spinning, and slowed every later run).
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.log_path = log_path

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"LitServe exited:\n{self.log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"LitServe not ready:\n{self.log_path.read_text()[-4000:]}")

    def predict(self, path: str) -> dict[str, Any]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/predict",
            data=json.dumps({"path": path}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def pass_s(self, paths: Sequence[str]) -> float:
        started = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = list(pool.map(self.predict, paths))
        assert all(len(a["top5"]) == 5 for a in answers)
        return time.perf_counter() - started

    def stop(self) -> None:
        """SIGTERM to the server's whole process group, SIGKILL to what is left after 30 s."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        time.sleep(1)  # its workers' own shutdown
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def litserve_rates(layout: Layout, paths: Sequence[str], repeat: int, log_dir: Path) -> list[float]:
    server = LitServeProcess(layout, log_dir / f"litserve-{layout.workers}.log")
    try:
        server.wait_ready()
        server.pass_s(paths)  # warm-up
        return [len(paths) / server.pass_s(paths) for _ in range(repeat)]
    finally:
        server.stop()


def imgcls_rates(
    layout: Layout, paths: Sequence[str], repeat: int, workdir: Path, log_dir: Path
) -> list[float]:
    redis_server = RedisServer(workdir).start()
    args = ["--weights", "none", "--allowed-root", str(Path(paths[0]).parent)]
    args += ["--log-level", "WARNING", "--processes", layout.processes]
    pool = WorkerPool(redis_server.url, MODEL, args, log_dir, layout.env(), ["auto"])
    client = Client.from_url(redis_server.url)
    try:
        pool.ensure(layout.workers, READY_TIMEOUT_S)
        _wait_warm(client, layout.workers * _processes(layout.processes))
        run_e2e(client, MODEL, paths, len(paths), 5, layout.workers)  # warm-up
        runs = [run_e2e(client, MODEL, paths, len(paths), 5, layout.workers) for _ in range(repeat)]
        assert all(r.all_done for r in runs), runs
        return [r.img_s for r in runs]
    finally:
        client.close()
        pool.stop()
        redis_server.stop()


def _processes(processes: str) -> int:
    """Worker processes ``--processes`` makes on this (CPU) machine."""
    return supervisor.parse_processes(processes) or supervisor.cpu_count()


def _wait_warm(client: Client, count: int) -> None:
    """Until ``count`` worker processes beat: a supervisor's later children start after its
    first is warm."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while len(registry.live_workers(client.redis, MODEL)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} worker processes warm")
        time.sleep(0.2)


def run_peer(
    workdir: Path,
    image_root: Path,
    log_dir: Path,
    images: int,
    repeat: int,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Every layout in turn on the same images; best of ``repeat`` passes each."""
    paths = [str(p) for p in image_pool(image_root, IMAGENET, images)]
    log_dir.mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    out = []
    for layout in LAYOUTS:
        if layout.server == "litserve":
            rates = litserve_rates(layout, paths, repeat, log_dir)
        else:
            rates = imgcls_rates(layout, paths, repeat, workdir, log_dir)
        out.append({"layout": layout.name, **vars(layout), "img_s": max(rates), "repeats": rates})
        log(f"peer: {layout.name}: {max(rates):,.1f} img/s (best of {repeat})")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__)
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    if args.serve:
        serve(args.serve, args.workers)
        return 0
    from bench.__main__ import main as bench_main

    return bench_main(["--stages", "peer", *rest])


if __name__ == "__main__":
    sys.exit(main())
