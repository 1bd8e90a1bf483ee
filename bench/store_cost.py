"""What each step of a job costs Redis: ``JobStore`` alone on a private redis-server (issue 10).

No worker, no Celery: jobs like the host path's (a 68-character path, a version, top-5 results)
are created, claimed in messages of 64, finished ``--finish-batch`` to a call (8 by default: a
CPU batch stored alone; the worker's store stage gathers up to 64 while more are in flight) and
read back once, and each
step's Redis CPU (``INFO cpu``) and command time (``INFO commandstats``) is divided by the jobs.
Best of ``--repeat`` per step. Also MEMORY USAGE of one finished record.

``python -m bench.store_cost [--jobs 4096] [--repeat 3]``; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis

from bench.services import RedisServer
from contract import keys
from contract.job import Job, Prediction, Priority
from contract.store import JobStore

URI = "/tmp/imgcls-bench-hostpath/images/small-64x48/img-000123-of-4000.jpg"
assert len(URI) == 68
CLAIM = 64
READ = 2000


def _jobs(n: int, run: int) -> list[Job]:
    now = time.time()
    return [
        Job(
            id=f"{run:04x}{i:028x}",
            uri=URI,
            model="null",
            top_k=5,
            version="86fbd1a5c6",
            priority=Priority.NORMAL,
            submitted=now,
        )
        for i in range(n)
    ]


def _done(job: Job) -> Job:
    predictions = [Prediction(f"class {i}", i * 97, 0.3 - i / 20) for i in range(5)]
    return job.done(predictions, "torchscript:null-model.pt#f4e9b88c317d", False, time.time())


def _cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _stats(client: redis.Redis) -> dict[str, tuple[int, int]]:
    return {
        k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
        for k, v in client.info("commandstats").items()
    }


def _step(
    client: redis.Redis, n: int, action: Callable[[], object]
) -> tuple[float, dict[str, list[float]]]:
    """µs of Redis CPU per job, and per command (calls, µs) per job, of ``action``."""
    stats0, cpu0 = _stats(client), _cpu(client)
    action()
    cpu, stats = _cpu(client) - cpu0, _stats(client)
    per = {
        name: [
            round((c - stats0.get(name, (0, 0))[0]) / n, 3),
            round((u - stats0.get(name, (0, 0))[1]) / n, 3),
        ]
        for name, (c, u) in stats.items()
        if c > stats0.get(name, (0, 0))[0] and name not in ("info",)
    }
    return 1e6 * cpu / n, per


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def run_once(
    client: redis.Redis, n: int, run: int, finish_batch: int
) -> dict[str, tuple[float, Any]]:
    store = JobStore(client)
    jobs = _jobs(n, run)
    ids = [j.id for j in jobs]
    claimed: list[Job] = []

    def create() -> None:
        for chunk in _batches(jobs, READ):
            store.create_many(chunk)

    def claim() -> None:
        for chunk in _batches(ids, CLAIM):
            claims = store.claim_many(chunk, "null", time.time(), "bench-worker-1", fresh_only=True)
            claimed.extend(c.job for c in claims if c.job is not None)

    def finish() -> None:
        for chunk in _batches(claimed, finish_batch):
            store.finish_many([_done(j) for j in chunk])

    def read() -> None:
        for chunk in _batches(ids, READ):
            store.get_many(chunk)

    out = {
        name: _step(client, n, step)
        for name, step in (("create", create), ("claim", claim), ("finish", finish), ("read", read))
    }
    assert len(claimed) == n
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.store_cost", description=__doc__)
    p.add_argument("--jobs", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--finish-batch", type=int, default=8, help="results per finish call")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="imgcls-store-cost-") as tmp:
        server = RedisServer(Path(tmp)).start()
        client = redis.Redis.from_url(server.url)
        try:
            runs = [run_once(client, args.jobs, r, args.finish_batch) for r in range(args.repeat)]
            last = _jobs(1, args.repeat - 1)[0].id
            usage = client.memory_usage(keys.job_key(last), samples=0)
        finally:
            client.close()
            server.stop()
    best = {step: min(r[step] for r in runs) for step in runs[0]}
    summary = {
        "us_per_job": {step: round(cpu, 2) for step, (cpu, _) in best.items()},
        "total_us_per_job": round(sum(cpu for cpu, _ in best.values()), 2),
        "all_runs_us": {step: [round(r[step][0], 2) for r in runs] for step in runs[0]},
        "commands_per_job": {step: per for step, (_, per) in best.items()},
        "memory_usage_finished_record": usage,
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
