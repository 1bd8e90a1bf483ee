"""The host path: what the job path costs per job when the model costs nothing (issue 10).

A TorchScript null model (mean colour -> 1000 logits through a fixed linear layer, served with
``--resize 16 --crop 16``) on small JPEGs from local disk; real worker processes with their
defaults; a private Redis of its own, so that its memory and CPU are the jobs' alone; jobs
submitted with ``Client.submit_many``. Per job: CPU of the worker processes, of Redis and of
the producer; Redis bytes a finished record holds; and Redis ``commandstats``.

``--shards N`` measures again with the job records spread over N private Redis instances
(``contract.shards``; the first also the broker), reporting Redis CPU per job for each server.

``--device-stand-in`` measures the GPU path too: workers whose device is a stand-in that costs
nothing (``bench.standin``), so that JPEGs stay encoded on the host (header check only) and
each batch's bytes are handed over in one call; with the GPU defaults for batch size and
concurrency. Its worker CPU per job is the host's share of serving a GPU.

``python -m bench.hostpath [--quick] [--hostpath-jobs N] [--scale-out 1,2] [--shards 2]
[--device-stand-in]`` runs this stage alone; it is ``python -m bench --stages hostpath``.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import torch

from bench.e2e import WAIT_PER_JOB_S, delete_jobs, submit
from bench.images import ImageSet, image_pool
from bench.report import record
from bench.services import RedisServer, WorkerPool
from contract import defaults, keys, registry
from contract.job import DONE
from contract.shards import shard_of
from producer.client import Client
from worker.settings import GPU_BATCH_SIZE, GPU_CONCURRENCY
from worker.supervisor import cpu_count

# The queue name the null model is served under.
NULL_MODEL = "null"
# Small JPEGs: decoding them costs little, so what remains is the job path.
SMALL = ImageSet("small", 64, 48, grain=16)
# The worker flags that make preprocessing nearly free for the null model.
NULL_PREPROCESS = ("--resize", "16", "--crop", "16")
# Finished records whose MEMORY USAGE is read and averaged.
KEY_SAMPLE = 100
# Commands the benchmark itself sends to read these figures; left out of commandstats.
PROBE_COMMANDS = {"info", "memory|usage", "memory", "strlen"}
# Seconds a worker may take to load the null model.
READY_TIMEOUT_S = 120
# The paths measured: the CPU path, and the GPU path on a device stand-in (bench.standin).
CPU_PATH = "cpu"
GPU_STAND_IN = "gpu-stand-in"
# How each path's workers start: the module run, and flags after the common ones. The CPU path's
# worker keeps its default layout (one process per core, each with one torch thread and one host
# thread); the stand-in is one process (its children would be plain workers), and runs on the
# CPU, so it is given the GPU defaults a GPU worker would pick for itself.
PATH_WORKERS: dict[str, tuple[str, tuple[str, ...]]] = {
    CPU_PATH: ("worker", ("--processes", "auto")),
    GPU_STAND_IN: (
        "bench.standin_worker",
        ("--batch-size", str(GPU_BATCH_SIZE), "--concurrency", str(GPU_CONCURRENCY)),
    ),
}


class NullModel(torch.nn.Module):
    """Mean colour -> 1000 logits through fixed weights: a model that takes no time."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3, 1000)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(1000, 3, generator=generator))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=(2, 3)))


def write_null_model(path: Path) -> Path:
    torch.jit.save(torch.jit.script(NullModel()), str(path))
    return path


@dataclass(frozen=True)
class HostPathResult:
    workers: int
    jobs: int
    done: int
    # From the first submit to the last ``finished`` stamp.
    seconds: float
    # CPU milliseconds per job: all worker processes (children included), Redis, the producer.
    worker_cpu_ms: float
    redis_cpu_ms: float
    producer_cpu_ms: float
    # Redis ``used_memory`` growth over the run, per finished job (queue messages are gone);
    # client buffers move it by tens of KB, so it means something over thousands of jobs.
    redis_bytes_per_job: float
    # MEMORY USAGE of a sample of finished records, averaged, and their stored length.
    record_bytes: float
    record_json_bytes: float
    # Per command (and script): calls and microseconds of Redis CPU per job, all servers.
    commandstats: dict[str, dict[str, float]]
    # Redis instances holding the job records, and the CPU ms per job of each (broker first).
    shards: int = 1
    redis_cpu_ms_per_server: tuple[float, ...] = ()
    # CPU_PATH, or GPU_STAND_IN: the GPU path with a device that costs nothing.
    path: str = CPU_PATH
    # Read events Redis served per job, all servers (about its round trips: each costs Redis
    # tens of µs of CPU on a small VM, whatever the commands in it).
    redis_reads_per_job: float = 0.0

    @property
    def jobs_s(self) -> float:
        return self.done / self.seconds


def process_tree_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of a process, its waited-for children, and its live
    descendants (a worker started with ``--processes auto`` serves in its children; Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except FileNotFoundError:  # exited since it was listed: its parent counts it as waited for
        return 0.0
    ticks = sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK") + sum(process_tree_cpu_s(c) for c in children)


def producer_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def redis_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def redis_reads(client: redis.Redis) -> int:
    return int(client.info("stats")["total_reads_processed"])


def commandstats(*clients: redis.Redis) -> dict[str, tuple[int, int]]:
    """Calls and microseconds per command since the servers started, summed over them."""
    total: dict[str, tuple[int, int]] = {}
    for client in clients:
        for name, v in client.info("commandstats").items():
            command = name.removeprefix("cmdstat_")
            if command not in PROBE_COMMANDS:
                calls, usec = total.get(command, (0, 0))
                total[command] = (calls + int(v["calls"]), usec + int(v["usec"]))
    return total


def _per_job(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], jobs: int
) -> dict[str, dict[str, float]]:
    out = {}
    for name, (calls, usec) in after.items():
        calls0, usec0 = before.get(name, (0, 0))
        if calls > calls0:
            out[name] = {"calls": (calls - calls0) / jobs, "usec": (usec - usec0) / jobs}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["usec"]))


def record_sizes(client: redis.Redis, ids: Sequence[str]) -> tuple[float, float]:
    """Mean MEMORY USAGE and mean length of the stored values of the records of ``ids``."""
    pipe = client.pipeline(transaction=False)
    for job_id in ids:
        pipe.memory_usage(keys.job_key(job_id), samples=0)
        pipe.strlen(keys.job_key(job_id))
    sizes = pipe.execute()
    usage, lengths = sizes[0::2], sizes[1::2]
    return sum(usage) / len(usage), sum(lengths) / len(lengths)


class HostPath:
    """Private Redis instances (the first the broker, all of them job-record shards), the null
    model's workers and a client: measure, grow, measure again."""

    def __init__(
        self,
        workdir: Path,
        uris: Sequence[str],
        log_dir: Path,
        shards: int = 1,
        path: str = CPU_PATH,
    ) -> None:
        self.uris = list(uris)
        self.path = path
        self.servers = [RedisServer(_subdir(workdir, f"redis{i}")).start() for i in range(shards)]
        self.redis = self.servers[0]
        self.admins = [redis.Redis.from_url(s.url) for s in self.servers]
        self.admin = self.admins[0]
        urls = [s.url for s in self.servers]
        self.client = Client.from_url(self.redis.url, store_urls=urls)
        model_file = write_null_model(workdir / "null-model.pt")
        root = Path(uris[0]).parent
        args = ["--model-file", str(model_file), *NULL_PREPROCESS, "--allowed-root", str(root)]
        args += ["--log-level", "WARNING", *(a for url in urls for a in ("--store-url", url))]
        module, extra = PATH_WORKERS[path]
        self.pool = WorkerPool(
            self.redis.url, NULL_MODEL, [*args, *extra], log_dir, {}, ["auto"], module
        )

    def __enter__(self) -> HostPath:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.pool.stop(graceful=exc_type is None)
        self.client.close()
        for admin, server in zip(self.admins, self.servers, strict=True):
            admin.close()
            server.stop()

    def grow(self, workers: int) -> None:
        """Start workers until ``workers`` run, and wait until every process of each serves."""
        self.pool.ensure(workers, READY_TIMEOUT_S)
        per_worker = cpu_count() if self.path == CPU_PATH else 1
        deadline = time.monotonic() + READY_TIMEOUT_S
        while len(registry.live_workers(self.admin, NULL_MODEL)) < workers * per_worker:
            if time.monotonic() > deadline:
                raise TimeoutError(f"not every process of {workers} worker(s) serves")
            time.sleep(0.2)

    def measure(self, n: int) -> HostPathResult:
        pids = list(self.pool.pids().values())
        cpu0, redis0, stats0 = self._cpu(pids), self._redis_cpu(), commandstats(*self.admins)
        memory0, reads0 = self._memory(), self._reads()
        started, producer0 = time.time(), producer_cpu_s()
        ids = submit(self.client, NULL_MODEL, self.uris, n, defaults.TOP_K)
        producer = producer_cpu_s() - producer0
        records = self.client.wait_many(ids, timeout=60 + WAIT_PER_JOB_S * n)
        cpu = self._cpu(pids) - cpu0
        redis1 = self._redis_cpu()
        redis_cpu = [after - before for before, after in zip(redis0, redis1, strict=True)]
        stats = _per_job(stats0, commandstats(*self.admins), n)
        memory, reads = self._memory() - memory0, self._reads() - reads0
        done = [r for r in records if r is not None and r.status == DONE]
        on_first = [r.id for r in done if shard_of(r.id, len(self.admins)) == 0]
        record_bytes, json_bytes = record_sizes(self.admin, on_first[:KEY_SAMPLE])
        for admin in self.admins:
            delete_jobs(admin, ids)
        finished = max((r.finished or started for r in done), default=time.time())
        return HostPathResult(
            workers=len(pids),
            jobs=n,
            done=len(done),
            seconds=finished - started,
            worker_cpu_ms=1000 * cpu / n,
            redis_cpu_ms=1000 * sum(redis_cpu) / n,
            producer_cpu_ms=1000 * producer / n,
            redis_bytes_per_job=memory / max(1, len(done)),
            record_bytes=record_bytes,
            record_json_bytes=json_bytes,
            commandstats=stats,
            shards=len(self.admins),
            redis_cpu_ms_per_server=tuple(1000 * c / n for c in redis_cpu),
            path=self.path,
            redis_reads_per_job=reads / n,
        )

    def _redis_cpu(self) -> list[float]:
        return [redis_cpu_s(a) for a in self.admins]

    def _reads(self) -> int:
        return sum(redis_reads(a) for a in self.admins)

    def _memory(self) -> int:
        return sum(int(a.info("memory")["used_memory"]) for a in self.admins)

    @staticmethod
    def _cpu(pids: Sequence[int]) -> float:
        return sum(process_tree_cpu_s(p) for p in pids)


def run_hostpath(
    workdir: Path,
    image_root: Path,
    log_dir: Path,
    jobs: int,
    worker_counts: Sequence[int],
    repeat: int,
    log: Callable[[str], None],
    shards: int = 1,
    stand_in: bool = False,
) -> list[dict[str, Any]]:
    """Best of ``repeat`` (by jobs/s) for each worker count, after a warm-up run; with one
    Redis, then again with ``shards`` of them when that is more; then, with ``stand_in``, the
    GPU path on a device stand-in (one Redis)."""
    uris = [str(p) for p in image_pool(image_root, SMALL, jobs)]
    runs = [(count, CPU_PATH) for count in sorted({1, shards})]
    runs += [(1, GPU_STAND_IN)] if stand_in else []
    out = []
    for count, path in runs:
        where = _subdir(workdir, f"{path}-shards{count}")
        with HostPath(where, uris, log_dir, count, path) as bench:
            out += _measure_each(bench, jobs, worker_counts, repeat, log)
    return out


def _measure_each(
    bench: HostPath,
    jobs: int,
    worker_counts: Sequence[int],
    repeat: int,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    out = []
    for count in sorted(set(worker_counts)):
        bench.grow(count)
        bench.measure(min(jobs, 200))
        tries = [bench.measure(jobs) for _ in range(repeat)]
        best = max(tries, key=lambda t: t.jobs_s)
        out.append(_summary(best, tries))
        per_server = ", ".join(f"{ms:.4f}" for ms in best.redis_cpu_ms_per_server)
        log(
            f"host path ({best.path}), {count} worker(s), {best.shards} Redis: "
            f"{best.jobs_s:,.0f} jobs/s; "
            f"CPU ms/job worker {best.worker_cpu_ms:.3f}, Redis {best.redis_cpu_ms:.3f} "
            f"({per_server}), producer {best.producer_cpu_ms:.3f}; "
            f"{best.redis_bytes_per_job:,.0f} Redis bytes/job"
        )
    return out


def _subdir(parent: Path, name: str) -> Path:
    path = parent / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _summary(best: HostPathResult, tries: list[HostPathResult]) -> dict[str, Any]:
    repeats = {
        "jobs_s": [t.jobs_s for t in tries],
        "worker_cpu_ms": [t.worker_cpu_ms for t in tries],
        "redis_cpu_ms": [t.redis_cpu_ms for t in tries],
    }
    return {**record(best, "jobs_s"), "repeats": repeats}


if __name__ == "__main__":
    from bench.__main__ import main

    sys.exit(main(["--stages", "hostpath", *sys.argv[1:]]))
