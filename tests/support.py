"""Helpers the integration tests share: real worker processes and generated images."""

from __future__ import annotations

from pathlib import Path

from demo.images import make_jpeg
from demo.stack import ROOT, RedisServer, WorkerProcess, free_port

__all__ = ["ROOT", "RedisServer", "WorkerProcess", "free_port", "make_jpeg", "write_images"]


def write_images(directory: Path, count: int, **kwargs: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = directory / f"img{i:05d}.jpg"
        path.write_bytes(make_jpeg(seed=i, **kwargs))
        paths.append(path)
    return paths
