"""Which Redis errors the worker waits out (retries) and which it reports at once."""

from __future__ import annotations

import pytest
import redis

from worker.resilience import is_transient


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'"),
        redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
        redis.ConnectionError("Connection reset by peer"),
        redis.ResponseError("BUSY Redis is busy running a script."),
        redis.ResponseError("NOSCRIPT No matching script. Please use EVAL."),
        redis.ResponseError("MASTERDOWN Link with MASTER is down"),
    ],
)
def test_redis_refusing_for_now_is_retried(error: Exception) -> None:
    assert is_transient(error)


@pytest.mark.parametrize(
    "error",
    [
        redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        redis.ResponseError("ERR user_script:3: attempt to compare nil with number"),
        ValueError("not Redis at all"),
    ],
)
def test_errors_about_the_command_or_data_are_not_retried(error: Exception) -> None:
    assert not is_transient(error)
