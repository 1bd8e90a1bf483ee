"""Redis key, channel and queue names: the one place both sides take them from."""

from __future__ import annotations

from contract.defaults import KEY_PREFIX
from contract.job import PRIORITIES, Priority


def job_key(job_id: str) -> str:
    """The record of one job: a packed string, see contract.record."""
    return f"{KEY_PREFIX}:job:{job_id}"


def batch_key(batch_id: str) -> str:
    """Hash of one batch, per store shard: its counters by status, total, times, output."""
    return f"{KEY_PREFIX}:batch:{batch_id}"


def batch_jobs_key(batch_id: str) -> str:
    """List of a batch's job IDs in submission order (per store shard), deleted when the batch
    finishes: what cancelling it goes through."""
    return f"{batch_key(batch_id)}:jobs"


def batch_holds_key(batch_id: str) -> str:
    """Set of the holds on a batch (per store shard): one token per submission still adding
    jobs, or ``contract.batch.KEPT_OPEN``; the batch does not finish while any remains."""
    return f"{batch_key(batch_id)}:holds"


def batch_results_key(batch_id: str) -> str:
    """List of a batch's job IDs in the order they became final (per store shard): a results
    cursor is a position in it."""
    return f"{batch_key(batch_id)}:results"


def names_key() -> str:
    """Hash of the texts job records refer to by short ID (worker names, what answered)."""
    return f"{KEY_PREFIX}:names"


def labels_key(model: str, answerer: int) -> str:
    """Hash of class index -> label of what answered ``model``'s jobs (a ``names_key`` ID)."""
    return f"{KEY_PREFIX}:labels:{model}:{answerer}"


def events_stream() -> str:
    """Capped stream with one entry (id, status, batch) per job that reached a final state."""
    return f"{KEY_PREFIX}:events"


def finished_channel() -> str:
    """Pub/sub channel on which workers announce the IDs of jobs that reached a final state."""
    return f"{KEY_PREFIX}:finished"


def webhook_due_key() -> str:
    """Sorted set of webhook deliveries (by webhook ID) scored by when each is next due."""
    return f"{KEY_PREFIX}:webhooks:due"


def webhook_state_key() -> str:
    """Hash of each pending webhook delivery's attempts so far and first try (JSON)."""
    return f"{KEY_PREFIX}:webhooks:state"


def webhook_dead_key() -> str:
    """List of webhook deliveries given up on (newest first), kept for inspection."""
    return f"{KEY_PREFIX}:webhooks:dead"


def queue_name(model: str, version: str, priority: str = Priority.NORMAL) -> str:
    """The Celery queue of ``model``'s ``version`` at ``priority`` (high, normal or low): only
    workers serving that version consume it, high first."""
    suffix = "" if priority == Priority.NORMAL else f".{Priority(priority).value}"
    return f"{KEY_PREFIX}.{model}@{version}{suffix}"


def queue_names(model: str, version: str) -> list[str]:
    """Every queue of ``model``'s ``version``, in the order its workers serve them."""
    return [queue_name(model, version, p) for p in PRIORITIES]


def model_key(model: str, version: str) -> str:
    """What the workers serving ``model``'s ``version`` declared about it (weights, classes)."""
    return f"{KEY_PREFIX}:model:{model}@{version}"


def versions_key(model: str) -> str:
    """Sorted set of ``model``'s registered versions, scored by when each was first seen."""
    return f"{KEY_PREFIX}:versions:{model}"


def declared_key(model: str) -> str:
    """What an operator declared about ``model`` (its default version, classes)."""
    return f"{KEY_PREFIX}:declared:{model}"


def models_set() -> str:
    """Set of every model name a worker has ever served or an operator declared."""
    return f"{KEY_PREFIX}:models"


def heartbeat_key(model: str, worker_id: str) -> str:
    """Exists while the worker ``worker_id`` serving ``model`` is alive and warm."""
    return f"{KEY_PREFIX}:worker:{model}:{worker_id}"


def heartbeat_pattern(model: str = "*") -> str:
    """SCAN pattern matching the heartbeat keys of ``model``'s workers."""
    return f"{KEY_PREFIX}:worker:{model}:*"


def held_key(model: str, worker_id: str) -> str:
    """Set of the delivery tags of the queue messages the worker ``worker_id`` holds."""
    return f"{KEY_PREFIX}:held:{model}:{worker_id}"


def held_owner(held: str) -> tuple[str, str]:
    """The (model, worker_id) whose held set is ``held`` (model names have no colon)."""
    model, _, worker_id = held.removeprefix(f"{KEY_PREFIX}:held:").partition(":")
    return model, worker_id


def held_sets_key() -> str:
    """Set of the names of every worker's held set (``held_key``), where recovery looks."""
    return f"{KEY_PREFIX}:held-sets"


def dead_letter_key() -> str:
    """List of queue messages that could not be understood, kept for inspection."""
    return f"{KEY_PREFIX}:dead-letter"


def stats_key(model: str) -> str:
    """Hash of counters per model (jobs done, failed, results written)."""
    return f"{KEY_PREFIX}:stats:{model}"


def text(value: bytes | str) -> str:
    """A key or value read back from Redis as str, whether or not the client decodes replies."""
    return value.decode() if isinstance(value, bytes) else value
