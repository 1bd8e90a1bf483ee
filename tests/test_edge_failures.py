"""A Redis that is down or refuses the password stops a command with one line and its exit
status: the URL's password masked, no traceback, and the worker never loads its model first."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from contract.redis_errors import EXIT_REDIS_AUTH, EXIT_REDIS_UNREACHABLE, mask_url
from tests.support import ROOT, RedisServer, free_port

PASSWORD = "right-pw-8f2e"
WRONG = "wrong-pw-c41a"


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("locked"), password=PASSWORD).start()
    yield server
    server.stop()


def _run(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    """``python -m ARGS`` with Redis at ``url``, given as operators do: in REDIS_URL."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REDIS_URL": url}
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=120
    )


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


_PRODUCER_COMMANDS = [
    ("submit", "/tmp/cat.jpg"),
    ("submit", "--wait", "5", "/tmp/cat.jpg"),
    ("result", "some-job"),
    ("status", "--interval", "0"),
    ("models", "list"),
]


@pytest.mark.parametrize("command", _PRODUCER_COMMANDS, ids=lambda c: " ".join(c))
def test_a_wrong_password_stops_a_producer_command_with_one_masked_line(
    locked_redis: RedisServer, command: tuple[str, ...]
) -> None:
    url = f"redis://:{WRONG}@127.0.0.1:{locked_redis.port}/0"
    result = _run("producer", *command, url=url)
    line = _one_line(result)
    assert result.returncode == EXIT_REDIS_AUTH
    assert "refused authentication" in line
    assert mask_url(url) in line and WRONG not in line


@pytest.mark.parametrize("command", _PRODUCER_COMMANDS, ids=lambda c: " ".join(c))
def test_an_unreachable_redis_stops_a_producer_command_with_one_line(
    command: tuple[str, ...],
) -> None:
    url = f"redis://:{WRONG}@127.0.0.1:{free_port()}/0"  # nothing listens there
    result = _run("producer", *command, url=url)
    line = _one_line(result)
    assert result.returncode == EXIT_REDIS_UNREACHABLE
    assert "is unreachable" in line and "Connection refused" in line
    assert WRONG not in line


def test_a_missing_password_is_an_auth_failure(locked_redis: RedisServer) -> None:
    url = f"redis://127.0.0.1:{locked_redis.port}/0"
    result = _run("producer", "result", "--redis-url", url, "some-job", url=url)
    assert "refused authentication" in _one_line(result)
    assert result.returncode == EXIT_REDIS_AUTH


# A model that cannot load would exit 2: an exit 3 or 4 shows that Redis was checked first.
_UNLOADABLE = ("--model", "no_such_model_xyz", "--device", "cpu")


def test_a_wrong_password_stops_the_worker_before_it_loads_the_model(
    locked_redis: RedisServer, tmp_path: Path
) -> None:
    url = f"redis://:{WRONG}@127.0.0.1:{locked_redis.port}/0"
    result = _run("worker", *_UNLOADABLE, "--allowed-root", str(tmp_path), url=url)
    line = _one_line(result)
    assert result.returncode == EXIT_REDIS_AUTH, result.stderr
    assert "refused authentication" in line and "worker not started" in line
    assert mask_url(url) in line and WRONG not in line


def test_an_unreachable_redis_stops_the_worker_before_it_loads_the_model(tmp_path: Path) -> None:
    url = f"redis://:{WRONG}@127.0.0.1:{free_port()}/0"
    result = _run("worker", *_UNLOADABLE, "--allowed-root", str(tmp_path), url=url)
    line = _one_line(result)
    assert result.returncode == EXIT_REDIS_UNREACHABLE, result.stderr
    assert "is unreachable" in line and WRONG not in line


def test_masking_keeps_the_user_and_hides_only_the_password() -> None:
    assert (
        mask_url("rediss://app:pw@redis.internal:6380/2")
        == "rediss://app:***@redis.internal:6380/2"
    )
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
