"""Shared fixtures: real servers on loopback, started by the tests and stopped after them."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from demo.stack import RedisServer, WorkerProcess, free_port

__all__ = ["RedisServer", "WorkerProcess", "free_port"]

# Worker processes the tests start serve in one process (``python -m worker`` would otherwise
# start one child per core); tests/test_supervisor.py asks for several with --processes.
os.environ.setdefault("IMGCLS_PROCESSES", "1")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """A clean database on the tests' own redis-server (never the shared 6379)."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3-compatible HTTP server on loopback; boto3 reaches it over real HTTP."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def aws_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """boto3's standard configuration, pointed at the local S3 endpoint."""
    env = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def s3_client(aws_env: dict[str, str]):
    import boto3

    return boto3.client("s3")


@pytest.fixture(scope="session")
def torch_home() -> Iterator[str]:
    """An empty TORCH_HOME so no test can pick up (or try to download) pretrained weights."""
    path = tempfile.mkdtemp(prefix="torch-home-")
    old = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = path
    yield path
    if old is None:
        os.environ.pop("TORCH_HOME", None)
    else:
        os.environ["TORCH_HOME"] = old
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_worker(redis_url: str, tmp_path: Path, torch_home: str) -> Iterator[object]:
    """Factory for real worker processes on the tests' Redis; stops each one afterwards."""
    started: list[WorkerProcess] = []

    def start(
        model: str,
        *args: str,
        wait: bool = True,
        env: dict[str, str] | None = None,
        workdir: Path | None = None,
    ) -> WorkerProcess:
        worker = WorkerProcess(
            redis_url,
            model,
            args,
            workdir or tmp_path,
            env={"TORCH_HOME": torch_home, "OMP_NUM_THREADS": "1", **(env or {})},
        )
        started.append(worker)
        return worker.start(wait=wait)

    yield start
    for worker in started:
        worker.stop()
