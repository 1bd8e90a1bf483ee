"""Helpers the integration tests share: real worker processes and generated images."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from contract import keys
from contract.events import Entry, JobEvent
from demo.images import make_jpeg
from demo.stack import ROOT, RedisServer, WorkerProcess, free_port

__all__ = [
    "ROOT",
    "RedisServer",
    "WorkerProcess",
    "free_port",
    "make_jpeg",
    "producer_help",
    "swapping_dir_for_symlink",
    "write_images",
]


def write_images(directory: Path, count: int, **kwargs: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = directory / f"img{i:05d}.jpg"
        path.write_bytes(make_jpeg(seed=i, **kwargs))
        paths.append(path)
    return paths


def producer_help(command: str) -> str:
    """What ``python -m producer COMMAND --help`` prints."""
    run = subprocess.run(
        [sys.executable, "-m", "producer", command, "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    return run.stdout


_SWAPPER = """
import os, sys
root, outside = sys.argv[1], sys.argv[2]
os.symlink(outside, os.path.join(root, "evil"))
d, parked, evil = (os.path.join(root, n) for n in ("dir", "parked", "evil"))
while True:
    os.rename(d, parked)
    os.rename(evil, d)
    os.rename(d, evil)
    os.rename(parked, d)
"""


@contextmanager
def swapping_dir_for_symlink(root: Path, outside: Path) -> Iterator[None]:
    """A process swaps ``root/dir`` for a symlink to ``outside``, as fast as it can, while the
    block runs."""
    swapper = subprocess.Popen([sys.executable, "-c", _SWAPPER, str(root), str(outside)])
    try:
        yield
    finally:
        swapper.kill()
        swapper.wait()


def job_events(client: redis.Redis) -> list[tuple[str, str, str]]:
    """(job ID, status, batch) of every completion event in the stream, oldest first; a
    batch's own finish event has no job ID."""
    entries: list[Entry] = client.xrange(keys.events_stream())  # type: ignore[assignment]
    return [(e.job_id, e.status, e.batch) for _, fields in entries for e in JobEvent.of(fields)]
