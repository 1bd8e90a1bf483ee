"""Celery on Redis, configured the same way for producers and workers.

A message carries a chunk of job IDs, never images: the job records in Redis are the truth.
"""

from __future__ import annotations

from celery import Celery

from contract import defaults
from contract.connection import celery_broker

TASK_NAME = "imgcls.classify"


def make_celery(
    redis_url: str, visibility_timeout_s: int = defaults.VISIBILITY_TIMEOUT_S
) -> Celery:
    """A Celery app on ``redis_url`` with JSON messages, late acks and a bounded redelivery time.

    ``redis_url`` is any URL ``contract.connection.connect`` takes, ``redis+sentinel://`` too."""
    broker, sentinel_options = celery_broker(redis_url)
    app = Celery("imgcls", broker=broker, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_backend=None,
        task_ignore_result=True,
        # Ack after the job's result is stored; a worker that dies mid-batch loses nothing.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        # No remote control: its pub/sub connection, once dropped (CLIENT KILL, a proxy
        # timeout), reconnects and then blocks the consumer's event loop for good, so the
        # worker stops taking, acking and restoring messages. Workers report via heartbeats.
        worker_enable_remote_control=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_heartbeat=0,
        broker_transport_options={
            "visibility_timeout": visibility_timeout_s,
            # Sweep for messages of dead workers often enough to honour the timeout, and to
            # restore soon the ones a worker's recovery sweep made due (worker/recovery.py).
            "unacked_restore_interval": max(1, min(5, visibility_timeout_s // 4)),
            "unacked_restore_throttle": 1,
            # BRPOP a worker's queues in the order it lists them (high, normal, low) every time,
            # instead of kombu's default round robin, which would rotate high to the back.
            "queue_order_strategy": "priority",
            "socket_keepalive": True,
            "retry_on_timeout": True,
            "health_check_interval": 10,
            **sentinel_options,
        },
        broker_pool_limit=10,
    )
    return app
