"""Where the host path's per-job CPU goes: py-spy on one worker during a host-path run.

``python -m bench.hostpath_profile [--jobs N] [--out DIR] [--device-stand-in]`` writes to DIR:
``worker.raw`` (py-spy's collapsed stacks), ``summary.json`` (the run's per-job figures, the
functions with the most samples in µs per job, inclusive and self, and one finished record's
bytes, field by field). Needs
``pip install py-spy`` and ptrace (root, or ``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.hostpath import CPU_PATH, GPU_STAND_IN, SMALL, HostPath
from bench.images import image_pool
from bench.report import record
from contract import keys
from contract import record as job_record

# py-spy samples per second; each sample of each active thread counts 1/RATE s of CPU.
RATE = 500
# Functions listed, inclusive and self.
TOP = 40


def collapsed(path: Path) -> Counter[tuple[str, ...]]:
    """py-spy's raw output: ``frame;frame;... count`` per line, root first."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def top_functions(stacks: Counter[tuple[str, ...]], jobs: int) -> dict[str, list[list[Any]]]:
    """Samples per function as µs of CPU per job: inclusive (once per stack) and self."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for stack, count in stacks.items():
        for frame in set(stack):
            inclusive[frame] += count
        own[stack[-1]] += count
    per_job = 1e6 / RATE / jobs
    return {
        "inclusive_us_per_job": [[f, round(n * per_job, 1)] for f, n in inclusive.most_common(TOP)],
        "self_us_per_job": [[f, round(n * per_job, 1)] for f, n in own.most_common(TOP)],
        "total_us_per_job": [["all samples", round(sum(stacks.values()) * per_job, 1)]],
    }


def record_breakdown(bench: HostPath) -> dict[str, Any]:
    """One finished top-5 record: key, bytes of its header and of each tagged field, Redis's
    total."""
    job = bench.client.submit_many(bench.uris[:1], model="null", top_k=5)[0]
    bench.client.wait_many([job.id], timeout=30)
    key = keys.job_key(job.id)
    value = bench.admin.get(key)
    assert isinstance(value, bytes)
    fields = job_record.stored(job.id, value).fields
    return {
        "key": key,
        "key_bytes": len(key),
        "value_bytes": len(value),
        "header_bytes": job_record.HEADER_BYTES,
        "field_bytes": {chr(t): len(job_record.field(t, v)) for t, v in fields.items()},
        "memory_usage": bench.admin.memory_usage(key, samples=0),
        "ttl_s": bench.admin.ttl(key),
        "record": repr(value),
    }


def py_spy() -> str:
    """py-spy on PATH, else the one installed beside this interpreter (a venv not activated)."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or str(beside)


def profile(
    workdir: Path, out: Path, jobs: int, path: str = CPU_PATH, gil: bool = False
) -> dict[str, Any]:
    uris = [str(p) for p in image_pool(workdir / "images", SMALL, jobs)]
    with HostPath(workdir, uris, workdir / "logs", path=path) as bench:
        bench.grow(1)
        bench.measure(min(jobs, 500))
        pid = next(iter(bench.pool.pids().values()))
        raw = out / "worker.raw"
        cmd = [py_spy(), "record", "-p", str(pid), "-r", str(RATE), "-f", "raw", "-o", str(raw)]
        # --subprocesses: the CPU path's worker is a supervisor of one process per core.
        cmd += ["--nonblocking", "--function", "--subprocesses", *(["--gil"] if gil else [])]
        spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        time.sleep(1)  # py-spy attaches
        result = bench.measure(jobs)
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)
        breakdown = record_breakdown(bench)
    return {
        "run": record(result, "jobs_s"),
        "worker_profile": top_functions(collapsed(raw), jobs),
        "record": breakdown,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hostpath_profile", description=__doc__)
    p.add_argument("--jobs", type=int, default=8000)
    p.add_argument("--out", type=Path, default=Path("hostpath-profile"))
    p.add_argument(
        "--device-stand-in", action="store_true", help="the GPU path, on a device stand-in"
    )
    p.add_argument(
        "--gil",
        action="store_true",
        help="sample only the thread holding the GIL: the Python work, without the waits that "
        "py-spy counts as active on a loaded machine",
    )
    args = p.parse_args(argv)
    path = GPU_STAND_IN if args.device_stand_in else CPU_PATH
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="imgcls-profile-") as tmp:
        summary = profile(Path(tmp), args.out.resolve(), args.jobs, path, args.gil)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["run"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
