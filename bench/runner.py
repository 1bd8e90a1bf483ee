"""One benchmark run: images, a private Redis, then per model the seed loop, the in-process
ceiling, end to end through worker processes, and latency, saving the JSON after each stage."""

from __future__ import annotations

import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
import torchvision

from bench.ceiling import InProcess, Throughput
from bench.config import TOP_K, BenchConfig
from bench.e2e import run_e2e, warm_up
from bench.images import IMAGE_SETS, image_pool, mean_bytes
from bench.latency import measure_latency
from bench.report import record, save
from bench.seed import seed_loop
from bench.services import RedisServer, WorkerPool
from bench.submit import DB as SUBMIT_DB
from bench.submit import submit_rate
from producer.client import Client
from worker.inference import pick_dtype

# Seconds a worker may take to load and warm its model (torch.compile takes minutes).
READY_TIMEOUT_S = 300
READY_TIMEOUT_COMPILE_S = 900


class Progress:
    """Timestamped progress lines on stderr; stdout is kept for the table."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def __call__(self, message: str) -> None:
        elapsed = time.perf_counter() - self.started
        print(f"[{elapsed:7.1f}s] {message}", file=sys.stderr, flush=True)


def _clamp(value: float, low: int, high: int) -> int:
    return int(max(low, min(high, value)))


def machine_info(device: str) -> dict[str, Any]:
    cuda = device.startswith("cuda")
    return {
        "hostname": socket.gethostname(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "loadavg_start": list(os.getloadavg()),
    }


def _cpu_model() -> str | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), None)


def new_report(cfg: BenchConfig) -> dict[str, Any]:
    o = cfg.options
    options = {
        **record(o),
        "dtype": str(pick_dtype(o.precision, torch.device(o.device))).removeprefix("torch."),
        "torch_threads_effective": torch.get_num_threads(),
        "flush_denormal": cfg.flush_denormal,
    }
    return {
        "schema": 1,
        "label": cfg.label,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "machine": machine_info(o.device),
        "options": options,
        "sizes": record(cfg.sizes),
        "stages": list(cfg.stages),
        "image_sets": {},
        "submit": None,
        "runs": [],
    }


class Bench:
    """Holds what every stage shares; each method runs one stage for one model."""

    def __init__(self, cfg: BenchConfig, report: dict[str, Any], workdir: Path) -> None:
        self.cfg = cfg
        self.report = report
        self.workdir = workdir
        self.image_root = (cfg.image_dir or workdir / "images").resolve()
        self.log_dir = cfg.log_dir or workdir / "logs"
        self.log = Progress()
        self.pools: dict[str, list[str]] = {}
        self.redis: RedisServer | None = None

    def save(self) -> None:
        save(self.report, self.cfg.out)

    def run(self) -> dict[str, Any]:
        with ExitStack() as stack:
            self.make_images()
            self.redis = RedisServer(self.workdir).start()
            stack.callback(self.redis.stop)
            if "submit" in self.cfg.stages:
                self.submit()
            for model in self.cfg.models:
                self.model(model)
        self.report["machine"]["loadavg_end"] = list(os.getloadavg())
        self.save()
        return self.report

    def make_images(self) -> None:
        for name in self.cfg.image_sets:
            spec = IMAGE_SETS[name]
            started = time.perf_counter()
            paths = image_pool(self.image_root, spec, self.cfg.sizes.pool[name])
            self.pools[name] = [str(p) for p in paths]
            self.report["image_sets"][name] = {
                **record(spec),
                "pool": len(paths),
                "mean_bytes": mean_bytes(paths),
            }
            self.log(f"{len(paths)} {name} images ready in {time.perf_counter() - started:.1f} s")
        self.save()

    def submit(self) -> None:
        assert self.redis is not None
        uri = next(iter(self.pools.values()))[0]
        rate = submit_rate(self.redis.url(SUBMIT_DB), uri, self.cfg.sizes.submit_jobs, TOP_K)
        self.report["submit"] = record(rate, "jobs_s")
        self.log(f"bulk submission: {rate.jobs_s:,.0f} jobs/s ({rate.jobs:,} jobs)")
        self.save()

    def model(self, name: str) -> None:
        runs = {s: {"model": name, "images": s, "e2e": []} for s in self.cfg.image_sets}
        self.report["runs"].extend(runs.values())
        stages = set(self.cfg.stages)
        if "seed" in stages:
            self.seed(name, runs)
        if stages & {"ceiling", "latency"}:
            self.in_process(name, runs)
        if stages & {"e2e", "latency"}:
            self.end_to_end(name, runs)
        for run in runs.values():
            _ratios(run, self.cfg.workers)
        self.save()

    def seed(self, name: str, runs: dict[str, dict[str, Any]]) -> None:
        s = self.cfg.sizes
        for image_set, run in runs.items():
            paths = [Path(p) for p in self.pools[image_set]]
            result = seed_loop(
                name, torch.device(self.cfg.options.device), paths, s.seed_seconds, s.seed_max
            )
            run["seed"] = record(result, "img_s")
            self.log(f"{name} {image_set}: (a) seed loop {result.img_s:,.1f} img/s")
            self.save()

    def in_process(self, name: str, runs: dict[str, dict[str, Any]]) -> None:
        assert self.redis is not None
        s = self.cfg.sizes
        settings = self.cfg.options.settings(name, self.redis.url(), (self.image_root,))
        with InProcess(settings) as ip:
            forward = ip.forward_only(s.forward_seconds, TOP_K)
            self.log(f"{name}: forward only {forward.img_s:,.1f} img/s")
            for image_set, run in runs.items():
                uris = self.pools[image_set]
                run["forward"] = record(forward, "img_s")
                run["batch1_ms"] = ip.batch1_ms(uris, s.batch1_n, TOP_K)
                if "ceiling" in self.cfg.stages:
                    run["ceiling"] = record(self._ceiling(ip, uris), "img_s")
                    self.log(f"{name} {image_set}: (b) in-process {run['ceiling']['img_s']:,.1f}")
                self.save()

    def _ceiling(self, ip: InProcess, uris: list[str]) -> Throughput:
        s = self.cfg.sizes
        # Warms up, and sizes the real run: its rate includes the ramp, so it is a low estimate.
        pilot = ip.ceiling(uris, s.warmup_jobs, TOP_K)
        n = _clamp(2 * pilot.img_s * s.ceiling_seconds, s.ceiling_min, s.ceiling_max)
        return ip.ceiling(uris, n, TOP_K)

    def end_to_end(self, name: str, runs: dict[str, dict[str, Any]]) -> None:
        assert self.redis is not None
        pool = WorkerPool(
            self.redis.url(),
            name,
            self._worker_args(),
            self.log_dir,
            self._worker_env(),
            _devices(self.cfg.options.device),
            "bench.worker_entry" if self.cfg.flush_denormal else "worker",
        )
        client = Client.from_url(self.redis.url())
        timeout = READY_TIMEOUT_COMPILE_S if self.cfg.options.compile else READY_TIMEOUT_S
        try:
            for count in sorted(set(self.cfg.scale_out)):
                started = time.perf_counter()
                pool.ensure(count, timeout)
                self.log(f"{name}: {count} worker(s) ready in {time.perf_counter() - started:.1f}s")
                for image_set, run in runs.items():
                    self._e2e_and_latency(client, name, image_set, run, count)
        finally:
            client.close()
            pool.stop()

    def _e2e_and_latency(
        self, client: Client, name: str, image_set: str, run: dict[str, Any], count: int
    ) -> None:
        s, uris = self.cfg.sizes, self.pools[image_set]
        if "e2e" in self.cfg.stages:
            pilot = warm_up(client, name, uris, s.warmup_jobs, TOP_K, count)
            n = s.e2e_jobs or self._e2e_jobs(run, pilot.img_s, count)
            result = run_e2e(client, name, uris, n, TOP_K, count)
            run["e2e"].append(record(result, "img_s", "all_done"))
            self.log(
                f"{name} {image_set}: (c) end to end, {count} worker(s): {result.img_s:,.1f} img/s"
                f" ({result.done}/{n} done)"
            )
        if "latency" in self.cfg.stages and count == min(self.cfg.scale_out):
            latency = measure_latency(
                client, name, uris, s.latency_n, s.latency_seconds, TOP_K, run["batch1_ms"]
            )
            run["latency"] = record(latency, "overhead_p50_ms", "overhead_p99_ms")
            self.log(
                f"{name} {image_set}: (d) latency p50 {latency.p50_ms:.1f} ms, p99 "
                f"{latency.p99_ms:.1f} ms, batch of one in-process {latency.batch1_ms:.1f} ms"
            )
        self.save()

    def _e2e_jobs(self, run: dict[str, Any], pilot_img_s: float, workers: int) -> int:
        """As many jobs per worker as the ceiling ran, for a like-for-like ramp, unless twice the
        pilot's rate says that would take much longer than ``e2e_seconds``."""
        s = self.cfg.sizes
        n = 2 * pilot_img_s * s.e2e_seconds
        if run.get("ceiling"):
            n = min(n, run["ceiling"]["images"] * workers)
        return _clamp(n, s.e2e_min, s.e2e_max)

    def _worker_args(self) -> list[str]:
        return [
            *self.cfg.options.cli_args(),
            *("--weights", "none", "--allowed-root", str(self.image_root)),
            *("--log-level", "WARNING"),
        ]

    def _worker_env(self) -> dict[str, str]:
        threads = self.cfg.options.torch_threads
        return {} if threads is None else {"OMP_NUM_THREADS": str(threads)}


def _devices(device: str) -> list[str]:
    """One worker per GPU when several are visible; otherwise all on the one device."""
    if device == "cuda" and torch.cuda.device_count() > 1:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [device]


def _ratios(run: dict[str, Any], workers: int) -> None:
    run["headline_workers"] = workers
    e2e = next((e for e in run["e2e"] if e["workers"] == workers), None)
    if e2e is None:
        return
    ratios = {}
    if run.get("seed"):
        ratios["e2e_over_seed"] = e2e["img_s"] / run["seed"]["img_s"]
    if run.get("ceiling"):
        ratios["e2e_over_ceiling"] = e2e["img_s"] / run["ceiling"]["img_s"]
    run["ratios"] = ratios


def run(cfg: BenchConfig) -> dict[str, Any]:
    torch.set_flush_denormal(cfg.flush_denormal)  # before any thread starts: threads inherit it
    if cfg.options.torch_threads is not None:
        torch.set_num_threads(cfg.options.torch_threads)
    workdir = Path(tempfile.mkdtemp(prefix="imgcls-bench-"))
    try:
        return Bench(cfg, new_report(cfg), workdir).run()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
