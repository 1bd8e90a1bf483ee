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

from bench.ceiling import InProcess
from bench.config import MODEL_STAGES, TOP_K, BenchConfig
from bench.diagnostics import BENCHMARK, Probe
from bench.e2e import run_e2e, warm_up
from bench.hostpath import run_hostpath
from bench.images import image_pool, mean_bytes
from bench.latency import measure_latency
from bench.mixed_images import ALL_IMAGE_SETS
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
        "hostpath": None,
        "peer": None,
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
        stages = set(self.cfg.stages)
        if stages & {"submit", *MODEL_STAGES}:
            self.queue_stages()
        if "hostpath" in stages:
            self.hostpath()
        if "peer" in stages:
            self.peer()
        self.report["machine"]["loadavg_end"] = list(os.getloadavg())
        self.save()
        return self.report

    def queue_stages(self) -> None:
        """Bulk submission and the per-model stages, on one private Redis."""
        with ExitStack() as stack:
            self.make_images()
            self.redis = RedisServer(self.workdir).start()
            stack.callback(self.redis.stop)
            if "submit" in self.cfg.stages:
                self.submit()
            if set(self.cfg.stages) & set(MODEL_STAGES):
                for model in self.cfg.models:
                    self.model(model)

    def hostpath(self) -> None:
        s = self.cfg.sizes
        self.report["hostpath"] = run_hostpath(
            self.workdir / "hostpath",
            self.image_root,
            self.log_dir,
            s.hostpath_jobs,
            self.cfg.scale_out,
            s.repeat,
            self.log,
            self.cfg.shards,
            self.cfg.stand_in,
        )
        self.save()

    def peer(self) -> None:
        from bench.peer import run_peer  # LitServe is an optional extra

        s = self.cfg.sizes
        self.report["peer"] = run_peer(
            self.workdir / "peer", self.image_root, self.log_dir, s.peer_images, s.repeat, self.log
        )
        self.save()

    def make_images(self) -> None:
        for name in self.cfg.image_sets:
            spec = ALL_IMAGE_SETS[name]
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
        rate = submit_rate(self.redis.db_url(SUBMIT_DB), uri, self.cfg.sizes.submit_jobs, TOP_K)
        self.report["submit"] = record(rate, "jobs_s")
        self.log(f"bulk submission: {rate.jobs_s:,.0f} jobs/s ({rate.jobs:,} jobs)")
        self.save()

    def model(self, name: str) -> None:
        runs = {s: {"model": name, "images": s, "e2e": []} for s in self.cfg.image_sets}
        self.report["runs"].extend(runs.values())
        stages = set(self.cfg.stages)
        if "seed" in stages:
            self.seed(name, runs)
        with ExitStack() as stack:
            ip = None
            if stages & {"ceiling", "latency"}:
                ip = stack.enter_context(self.in_process(name, runs))
            client, pool = None, None
            if stages & {"e2e", "latency"}:
                pool = stack.enter_context(self.worker_pool(name))
                client = Client.from_url(self._redis().url)
                stack.callback(client.close)
            for count in sorted(set(self.cfg.scale_out)) if pool else [self.cfg.workers]:
                if pool is not None:
                    self.grow(pool, count)
                probe = self.probe(pool)
                for image_set, run in runs.items():
                    self.measure(ip, client, probe, name, image_set, run, count)
        for run in runs.values():
            _ratios(run, self.cfg.workers)
        self.save()

    def _redis(self) -> RedisServer:
        assert self.redis is not None, "the private Redis starts before any model"
        return self.redis

    def seed(self, name: str, runs: dict[str, dict[str, Any]]) -> None:
        s = self.cfg.sizes
        device = torch.device(self.cfg.options.device)
        for image_set, run in runs.items():
            paths = [Path(p) for p in self.pools[image_set]]
            tries = [
                seed_loop(name, device, paths, s.seed_seconds / s.repeat, s.seed_max)
                for _ in range(s.repeat)
            ]
            run["seed"] = _best(tries)
            self.log(f"{name} {image_set}: (a) seed loop {run['seed']['img_s']:,.1f} img/s")
            self.save()

    def in_process(self, name: str, runs: dict[str, dict[str, Any]]) -> InProcess:
        """The worker's runtime in this process, kept (idle) while the workers run, so that the
        ceiling and end-to-end measurements can alternate under the same background load."""
        s = self.cfg.sizes
        settings = self.cfg.options.settings(name, self._redis().url, (self.image_root,))
        ip = InProcess(settings)
        forward = ip.forward_only(s.forward_seconds, TOP_K)
        self.log(f"{name}: forward only {forward.img_s:,.1f} img/s")
        for run in runs.values():
            run["forward"] = record(forward, "img_s")
        self.save()
        return ip

    def worker_pool(self, name: str) -> WorkerPool:
        return WorkerPool(
            self._redis().url,
            name,
            self._worker_args(),
            self.log_dir,
            self._worker_env(),
            _devices(self.cfg.options.device),
        )

    def probe(self, pool: WorkerPool | None) -> Probe:
        """CPU of the workers and of Redis, and the workers' metrics, for end-to-end runs."""
        if pool is None:
            return Probe()
        proc = self._redis().proc
        redis_pid = proc.pid if proc is not None else None
        pids = {**pool.pids(), **({"redis": redis_pid} if redis_pid else {})}
        return Probe(pids=pids, metrics_ports=pool.metrics_ports())

    def grow(self, pool: WorkerPool, count: int) -> None:
        timeout = READY_TIMEOUT_COMPILE_S if self.cfg.options.compile else READY_TIMEOUT_S
        started = time.perf_counter()
        pool.ensure(count, timeout)
        self.log(f"{pool.model}: {count} worker(s) ready in {time.perf_counter() - started:.1f} s")

    def measure(
        self,
        ip: InProcess | None,
        client: Client | None,
        probe: Probe,
        name: str,
        image_set: str,
        run: dict[str, Any],
        workers: int,
    ) -> None:
        """Ceiling and end to end, alternating ``repeat`` times (best kept), then latency."""
        s, uris, stages = self.cfg.sizes, self.pools[image_set], self.cfg.stages
        first = workers == min(self.cfg.scale_out)
        ceiling = ip if ip is not None and "ceiling" in stages and first else None
        e2e = client if client is not None and "e2e" in stages else None
        n_ceiling = self._ceiling_jobs(ceiling, uris) if ceiling else 0
        n_e2e = self._e2e_jobs(e2e, name, uris, n_ceiling, workers) if e2e else 0
        ceilings, e2es = [], []
        for _ in range(s.repeat):
            if ceiling:
                ceilings.append(ceiling.ceiling(uris, n_ceiling, TOP_K))
            if e2e:
                e2es.append(run_e2e(e2e, name, uris, n_e2e, TOP_K, workers, probe))
        if ceilings:
            run["ceiling"] = _best(ceilings)
            self.log(f"{name} {image_set}: (b) in-process {run['ceiling']['img_s']:,.1f} img/s")
        if e2es:
            run["e2e"].append(_best(e2es, "all_done"))
            run["e2e"][-1]["all_repeats_done"] = all(r.all_done for r in e2es)
            best = run["e2e"][-1]
            self.log(
                f"{name} {image_set}: (c) end to end, {workers} worker(s): {best['img_s']:,.1f}"
                f" img/s ({best['done']}/{best['jobs']} done)"
            )
        if client is not None and ip is not None and "latency" in stages and first:
            self.latency(ip, client, name, image_set, run)
        self.save()

    def _ceiling_jobs(self, ip: InProcess, uris: list[str]) -> int:
        """A pilot run warms up and sizes the real one (at its rate, ramp included)."""
        s = self.cfg.sizes
        pilot = ip.ceiling(uris, s.warmup_jobs, TOP_K)
        return _clamp(pilot.img_s * s.ceiling_seconds, s.ceiling_min, s.ceiling_max)

    def _e2e_jobs(
        self, client: Client, name: str, uris: list[str], n_ceiling: int, workers: int
    ) -> int:
        """As many jobs per worker as the ceiling ran, for a like-for-like ramp, unless the
        pilot's rate says that would take much longer than ``e2e_seconds``."""
        s = self.cfg.sizes
        if s.e2e_jobs:
            warm_up(client, name, uris, s.warmup_jobs, TOP_K, workers)
            return s.e2e_jobs
        pilot = warm_up(client, name, uris, s.warmup_jobs, TOP_K, workers)
        n = 1.5 * pilot.img_s * s.e2e_seconds
        if n_ceiling:
            n = min(n, n_ceiling * workers)
        return _clamp(n, s.e2e_min, s.e2e_max)

    def latency(
        self, ip: InProcess, client: Client, name: str, image_set: str, run: dict[str, Any]
    ) -> None:
        s = self.cfg.sizes
        latency = measure_latency(
            client,
            name,
            self.pools[image_set],
            s.latency_n,
            s.latency_seconds,
            TOP_K,
            lambda uri: ip.one_image_s(uri, TOP_K),
        )
        run["latency"] = record(latency)
        run["batch1_ms"] = latency.batch1_ms
        self.log(
            f"{name} {image_set}: (d) latency p50 {latency.p50_ms:.1f} ms, p99 "
            f"{latency.p99_ms:.1f} ms; overhead p50 {latency.overhead_p50_ms:.1f} ms "
            f"(batch of one in-process {latency.batch1_ms:.1f} ms)"
        )

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


def _best(tries: list[Any], *properties: str) -> dict[str, Any]:
    """The fastest of repeated measurements, with every rate: on a shared machine, the others
    are slowed by load that is not the code's."""
    best = max(tries, key=lambda t: t.img_s)
    return {**record(best, "img_s", *properties), "repeats": [t.img_s for t in tries]}


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
        ratios["e2e_over_ceiling_cpu"] = _cpu_ratio(run["ceiling"], e2e)
    run["ratios"] = ratios


def _cpu_ratio(ceiling: dict[str, Any], e2e: dict[str, Any]) -> float | None:
    """Ceiling CPU per image over the service's (workers and Redis) end to end: the rate ratio
    when both saturate the same cores, whatever else runs on the machine."""
    inside = (ceiling.get("diagnostics") or {}).get("cpu_ms_per_image", {}).get(BENCHMARK)
    service = (e2e.get("diagnostics") or {}).get("service_cpu_ms_per_image")
    return inside / service if inside and service else None


def run(cfg: BenchConfig) -> dict[str, Any]:
    torch.set_flush_denormal(cfg.flush_denormal)  # before any thread starts: threads inherit it
    if cfg.options.torch_threads is not None:
        torch.set_num_threads(cfg.options.torch_threads)
    workdir = Path(tempfile.mkdtemp(prefix="imgcls-bench-"))
    try:
        return Bench(cfg, new_report(cfg), workdir).run()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
