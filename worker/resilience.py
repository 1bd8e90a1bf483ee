"""Riding out a Redis outage: retry with capped, jittered exponential backoff until it is back.

Dropping a message because Redis blinked would lose its jobs; waiting only delays them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import redis
import tenacity

log = logging.getLogger(__name__)
T = TypeVar("T")

# Redis unreachable, still loading its data, or refusing writes for now (out of memory, or a
# replica that was the primary before a failover): all pass, and the write must not be lost.
REDIS_DOWN = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.BusyLoadingError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
)


# Replies of a Redis that is busy (a long script), lost its scripts (a restart or SCRIPT FLUSH)
# or is failing over: the command did not run and may be sent again.
_TRANSIENT_REPLIES = ("BUSY", "NOSCRIPT", "MASTERDOWN", "TRYAGAIN", "LOADING")


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` says Redis could not run the command for now (retry), not that the
    command or the data is wrong."""
    if isinstance(error, REDIS_DOWN):
        return True
    return isinstance(error, redis.ResponseError) and str(error).startswith(_TRANSIENT_REPLIES)


def _log_retry(state: tenacity.RetryCallState) -> None:
    cause = state.outcome.exception() if state.outcome is not None else None
    log.warning("Redis unavailable (%s); retrying", cause)


def retry_redis(call: Callable[[], T]) -> T:
    """``call()``, retried while Redis is transiently unavailable. The first try runs bare:
    building the retry machinery costs more than a round trip, and is needed only after a
    failure, which then counts as its first attempt."""
    first_failure: Exception | None
    try:
        return call()
    except Exception as e:
        if not is_transient(e):
            raise
        first_failure = e

    def again() -> T:
        nonlocal first_failure
        if first_failure is not None:
            failure, first_failure = first_failure, None
            raise failure
        return call()

    return _retrying()(again)


def _retrying() -> tenacity.Retrying:
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_transient),
        wait=tenacity.wait_random_exponential(multiplier=0.05, max=2.0),
        before_sleep=_log_retry,
        reraise=True,
    )
