"""Queue messages the worker cannot run go to the dead-letter list instead of into Celery.

Celery's Redis transport decodes every message it pops before any Celery hook runs: bytes that
are not JSON, or JSON that is not a kombu envelope, raise inside the consumer's event loop and
stop the worker, and the popped message is gone. So each popped message is checked here, while
the BRPOP reply is parsed; one that is not a well-formed classify task is kept, with the reason,
under ``keys.dead_letter_key()`` and never reaches Celery. The service records job IDs whose
records are missing or corrupt here too: one writer, one entry shape.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeGuard

import redis
from celery import bootsteps

from contract import deadletter
from contract.messaging import TASK_NAME
from worker.resilience import retry_redis

log = logging.getLogger(__name__)

# Characters of a rejected message kept in its dead-letter entry.
MAX_KEPT_CHARS = 10_000
# Celery message headers that delay or expire a task.
_TIMING = ("eta", "countdown", "expires")


class DeadLetters:
    """Checks the messages a worker pops and records the ones it cannot run."""

    def __init__(self, client: redis.Redis, worker_id: str) -> None:
        self.redis = client
        self.worker_id = worker_id

    def guard(self, channel: Any) -> None:
        """Check every message ``channel`` pops (a kombu Redis channel) before Celery sees it."""
        parse: Callable[..., Sequence[bytes | str] | None]
        parse = channel.client.response_callbacks["BRPOP"]

        def checked(response: object, **options: object) -> object:
            return self._checked(channel, parse(response, **options))

        channel.client.set_response_callback("BRPOP", checked)
        _retry_unacked_writes(channel.qos)

    def _checked(self, channel: Any, reply: Sequence[bytes | str] | None) -> object:
        """The BRPOP reply, or None (kombu reads it as "nothing popped") for a bad message."""
        if not reply:
            return reply
        queue, raw = reply
        reason = rejection(raw, channel)
        if reason is None:
            return reply
        self.record(reason, queue=_text(queue), message=_text(raw))
        return None

    def record(self, reason: str, *, queue: str, message: str, **extra: object) -> None:
        """Keep what could not be run: the whole message, with ``extra`` fields (the job IDs
        whose records were missing, say)."""
        log.error("dead-lettered a message from %s: %s", queue, reason)
        entry = {
            "reason": reason,
            "queue": queue,
            "message": message[:MAX_KEPT_CHARS],
            **extra,
            "worker": self.worker_id,
            "at": time.time(),
        }
        try:
            retry_redis(lambda: deadletter.append(self.redis, entry))
        except redis.RedisError as e:
            log.error("could not dead-letter the message (dropped): %s", e)


def _retry_unacked_writes(qos: Any) -> None:
    """kombu records each popped message as unacked (ZADD, HSET) before Celery runs it; a
    refused write (out of memory) would raise in the event loop, stop the worker and lose the
    popped message. Retried instead, until Redis takes it."""
    append = qos.append
    if getattr(append, "retried", False):
        return

    def retried(message: Any, delivery_tag: str) -> None:
        retry_redis(lambda: append(message, delivery_tag))

    retried.retried = True  # type: ignore[attr-defined]
    qos.append = retried


def rejection(raw: bytes | str, channel: Any) -> str | None:
    """Why a popped message cannot be run as a classify task; None when it can."""
    try:
        message = channel.Message(json.loads(raw), channel=channel)
        message.delivery_info["exchange"], message.delivery_info["routing_key"]
    except Exception as e:
        return f"not a kombu message: {e.__class__.__name__}: {e}"
    if message.content_type != "application/json":
        # Never decoded: a pickle body would run code.
        return f"content type {message.content_type!r} is not application/json"
    try:
        body = json.loads(message.body)
    except (TypeError, ValueError) as e:
        return f"body is not JSON: {e}"
    return _task_rejection(message.headers, body)


def _task_rejection(headers: object, body: object) -> str | None:
    task = headers.get("task") if isinstance(headers, dict) else None
    if task != TASK_NAME:
        return f"unknown task {str(task)[:100]!r}"
    timed = [f"{k}={str(v)[:40]}" for k in _TIMING if (v := _header(headers, k)) is not None]
    if timed:
        # Celery would hold a message with an eta and silently drop an expired one: either way
        # its jobs would stay queued. The producer never sets these.
        return f"sets {', '.join(timed)}; jobs are never delayed or expired by their message"
    if not (isinstance(body, list) and len(body) == 3):
        return "body is not [args, kwargs, options]"
    args, kwargs, _ = body
    if kwargs or not isinstance(args, list) or len(args) != 1 or not is_job_ids(args[0]):
        return "arguments are not one list of job ID strings"
    return None


def _header(headers: object, name: str) -> object:
    return headers.get(name) if isinstance(headers, dict) else None


def is_job_ids(value: object) -> TypeGuard[list[str]]:
    """The one check of a classify task's argument: a list of job ID strings."""
    return isinstance(value, list) and all(isinstance(i, str) for i in value)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def guard_step(dead_letters: DeadLetters) -> type[bootsteps.StartStopStep]:
    """A consumer bootstep that guards the task consumer's channel, again after each reconnect."""

    class QueueGuard(bootsteps.StartStopStep):
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def start(self, c: Any) -> None:
            dead_letters.guard(c.task_consumer.channel)

    return QueueGuard
