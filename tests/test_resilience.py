"""Which Redis errors the worker waits out (retries) and which it reports at once."""

from __future__ import annotations

import pytest
import redis

from worker import resilience
from worker.resilience import is_transient, retry_redis


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


class Flaky:
    """Fails with ``errors`` in turn, then returns how many calls it took."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.calls


def test_a_call_that_succeeds_builds_no_retry_machinery(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resilience, "_retrying", None)  # calling it would raise TypeError
    assert retry_redis(Flaky()) == 1


def test_transient_failures_are_retried_and_logged_until_the_call_succeeds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    down = redis.ConnectionError("Connection refused")
    assert retry_redis(Flaky(down, down)) == 3
    assert caplog.text.count("Redis unavailable (Connection refused); retrying") == 2


def test_a_failure_that_is_not_transient_is_raised_at_once() -> None:
    call = Flaky(redis.ResponseError("WRONGTYPE"))
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        retry_redis(call)
    assert call.calls == 1
