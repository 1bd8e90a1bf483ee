"""Priorities under a backlog: with ``--backlog`` low-priority jobs queued, how long does a
high-priority job take, against the idle latency and the time of what a worker holds?

The bound the service promises: a high job's latency stays within twice the idle latency plus
the time of what the worker holds when it arrives (``CPU_CONCURRENCY`` messages of up to
``CHUNK_SIZE`` jobs: the high job's message is taken next, its images loaded after theirs).
A private Redis and one real worker serving a tiny TorchScript model (logits from the mean
colour), so the numbers measure the queueing, not a network.

    python -m bench.priority [--backlog 10000] [--samples 5] [--out priority.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from contract import defaults
from demo.images import make_jpeg
from demo.stack import RedisServer, WorkerProcess
from producer.client import Client
from worker.settings import CPU_CONCURRENCY

MODEL = "tiny"
CLASSES = 10
# Longest one job or the whole backlog may take before the run fails.
JOB_TIMEOUT_S = 120


class _MeanColour(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def _worker_args(root: Path) -> list[str]:
    model, labels = root / "tiny.pt", root / "labels.txt"
    torch.jit.save(torch.jit.script(_MeanColour().eval()), str(model))
    labels.write_text("\n".join(f"class{i}" for i in range(CLASSES)))
    return [
        "--model-file", str(model), "--labels", str(labels), "--resize", "32", "--crop", "32",
        "--device", "cpu", "--allowed-root", str(root),
    ]  # fmt: skip


def _images(root: Path, count: int = 16) -> list[str]:
    paths = []
    for i in range(count):
        path = root / f"img{i:02d}.jpg"
        path.write_bytes(make_jpeg(64, 64, seed=i))
        paths.append(str(path))
    return paths


def _latency(client: Client, uri: str) -> float:
    """Seconds from submission to the result, as the record stamps them, for one high job."""
    job = client.submit(uri, model=MODEL, priority="high")
    record = client.wait(job.id, JOB_TIMEOUT_S)
    if record is None or record.status != "done" or record.finished is None:
        raise RuntimeError(f"high-priority job ended {record}")
    return record.finished - (record.submitted or record.finished)


def _held_s(client: Client, images: list[str]) -> float:
    """Seconds the low jobs a worker holds at once take, first start to last finish."""
    held = CPU_CONCURRENCY * defaults.CHUNK_SIZE
    uris = (images * (held // len(images) + 1))[:held]
    jobs = client.submit_many(uris, model=MODEL, priority="low")
    done = [j for j in client.wait_many([j.id for j in jobs], JOB_TIMEOUT_S) if j is not None]
    return max(j.finished or 0 for j in done) - min(j.started or 0 for j in done)


def measure(client: Client, images: list[str], backlog: int, samples: int) -> dict[str, object]:
    for uri in images[:3]:  # warm up the first shapes
        _latency(client, uri)
    idle = [_latency(client, images[i % len(images)]) for i in range(samples)]
    held_s = _held_s(client, images)
    uris = (images * (backlog // len(images) + 1))[:backlog]
    low = [j.id for j in client.submit_many(uris, model=MODEL, priority="low")]
    loaded = [_latency(client, images[i % len(images)]) for i in range(samples)]
    low_done = sum(j is not None and j.status == "done" for j in client.get_many(low))
    client.wait_many(low, JOB_TIMEOUT_S * 10)
    bound = 2 * statistics.median(idle) + held_s
    return {
        "backlog": backlog,
        "idle_p50_s": round(statistics.median(idle), 4),
        "held_s": round(held_s, 4),
        "loaded_max_s": round(max(loaded), 4),
        "loaded_p50_s": round(statistics.median(loaded), 4),
        "bound_s": round(bound, 4),
        "within_bound": max(loaded) <= bound,
        "low_done_when_high_finished": low_done,
    }


def run(backlog: int, samples: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="imgcls-priority-") as tmp:
        root = Path(tmp)
        server = RedisServer(root).start()
        worker = WorkerProcess(server.url, MODEL, _worker_args(root), root)
        client = Client.from_url(server.url)
        try:
            worker.start(timeout=JOB_TIMEOUT_S)
            return measure(client, _images(root), backlog, samples)
        finally:
            client.close()
            worker.stop()
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=10_000, help="low-priority jobs queued")
    parser.add_argument("--samples", type=int, default=5, help="high jobs timed, idle and loaded")
    parser.add_argument("--out", type=Path, default=Path("priority.json"), help="JSON report")
    args = parser.parse_args(argv)
    report = run(args.backlog, args.samples)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0 if report["within_bound"] else 1


if __name__ == "__main__":
    sys.exit(main())
