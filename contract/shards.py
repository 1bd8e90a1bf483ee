"""Job records spread over several Redis instances: one ``JobStore`` per shard, routed by job ID.

The first Redis (the broker: ``--redis-url``) keeps the Celery queues, heartbeats, the model
registry, dead letters and recovery bookkeeping; the job records, their per-model counters and
the finished-jobs announcements live on the shard that a rendezvous hash of the job ID picks
from the list of store URLs (``--store-url``, default: the broker alone).

The list is fixed for a deployment: its order and length decide where every record lives, so
every worker and producer must be given the same list, and changing it strands the records of
jobs already submitted (they are not moved). Appending a shard to a list would move about
1/(N+1) of the IDs (rendezvous hashing), which is what a future migration tool would copy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import redis

from contract import defaults
from contract.batch import Batch, BatchSpec, decode_cursor, encode_cursor
from contract.batch import from_hashes as batch_from_hashes
from contract.connection import connect
from contract.job import Job
from contract.store import JobStore, Unsettled

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")


def parse_urls(values: Iterable[str]) -> tuple[str, ...]:
    """Store URLs from repeated options and comma-separated environment values, in order."""
    urls = tuple(u.strip() for value in values for u in value.split(",") if u.strip())
    if len(set(urls)) != len(urls):
        raise ValueError("a store URL is given twice: each shard must be a different Redis")
    return urls


def shard_of(job_id: str, shards: int) -> int:
    """The index of the shard that holds ``job_id``: the same in every process and release.

    Rendezvous (highest random weight) hashing over the shard positions, with BLAKE2b so that
    neither Python's per-process hash seed nor the platform changes the answer.
    """
    if shards == 1:
        return 0
    encoded = job_id.encode()
    return max(range(shards), key=lambda i: _weight(i, encoded))


def _weight(shard: int, job_id: bytes) -> bytes:
    return hashlib.blake2b(job_id, digest_size=8, salt=shard.to_bytes(8, "little")).digest()


def connect_all(
    urls: Sequence[str], broker_url: str, broker: redis.Redis, **kwargs: Any
) -> list[redis.Redis]:
    """A client per store URL (``broker`` itself where a URL is the broker's), in order."""
    return [broker if url == broker_url else connect(url, **kwargs) for url in urls]


def _per_shard(
    method: Callable[Concatenate[JobStore, Sequence[str], P], list[R]],
) -> Callable[Concatenate[ShardedStore, Sequence[str], P], list[R]]:
    """``ShardedStore``'s form of a ``JobStore`` method on job IDs: the same arguments, the
    method called once per shard on that shard's IDs, the answers back in input order."""

    def routed(
        self: ShardedStore, job_ids: Sequence[str], /, *args: P.args, **kwargs: P.kwargs
    ) -> list[R]:
        return self._routed(job_ids, str, lambda store, ids: method(store, ids, *args, **kwargs))

    return routed


class ShardedStore:
    """``JobStore``'s API over several Redis instances; results keep the order of the input.

    Each call makes one round trip per shard that holds any of its jobs, one after the other.
    """

    def __init__(self, clients: Sequence[redis.Redis], ttl_s: int = defaults.QUEUED_TTL_S) -> None:
        if not clients:
            raise ValueError("a sharded store needs at least one Redis")
        self.shards = tuple(JobStore(c, ttl_s) for c in clients)
        self.clients = tuple(clients)

    def close(self, keep: redis.Redis | None = None) -> None:
        """Close every shard's client but ``keep`` (the broker's, closed by its owner)."""
        for client in self.clients:
            if client is not keep:
                client.close()

    def shard_for(self, job_id: str) -> JobStore:
        return self.shards[shard_of(job_id, len(self.shards))]

    def create_many(self, jobs: Sequence[Job], batch: BatchSpec | None = None) -> list[bool]:
        """Store new records; a job whose ID already exists is left as it is (False)."""
        return self._routed(
            jobs, lambda j: j.id, lambda store, chunk: store.create_many(chunk, batch)
        )

    def get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        return self._routed(job_ids, str, JobStore.get_many)

    def get(self, job_id: str) -> Job | None:
        return self.shard_for(job_id).get(job_id)

    def settled(self, job_ids: Sequence[str]) -> list[bool]:
        return self._routed(job_ids, str, JobStore.settled)

    def get_final_many(self, job_ids: Sequence[str]) -> list[Job | Unsettled | None]:
        return self._routed(job_ids, str, JobStore.get_final_many)

    # Mark jobs running and count an attempt, one round trip per shard: JobStore's arguments.
    claim_many = _per_shard(JobStore.claim_many)

    # End queued or running jobs cancelled, one round trip per shard: JobStore's arguments.
    cancel_many = _per_shard(JobStore.cancel_many)

    def finish_many(self, jobs: Sequence[Job]) -> list[bool]:
        """Store final records; each shard announces its own jobs on its finished channel."""
        return self._routed(jobs, lambda j: j.id, JobStore.finish_many)

    def stats(self, model: str) -> dict[str, int]:
        """``model``'s counters summed over the shards."""
        total: dict[str, int] = {}
        for store in self.shards:
            for name, count in store.stats(model).items():
                total[name] = total.get(name, 0) + count
        return total

    def close_batch(self, batch_id: str, hold: str | None = None) -> bool:
        """``JobStore.close_batch`` on every shard, each tried even if one before failed (the
        first error is raised after); True when some shard finished its part of it now."""
        finished, error = False, None
        for store in self.shards:
            try:
                finished = store.close_batch(batch_id, hold) == 1 or finished
            except redis.RedisError as e:
                error = error or e
        if error is not None:
            raise error
        return finished

    def batch(self, batch_id: str) -> Batch | None:
        """The batch summed over the shards; None when no shard has it (unknown, expired)."""
        return batch_from_hashes(batch_id, [store.batch_hash(batch_id) for store in self.shards])

    def batch_results(self, batch_id: str, cursor: str | None, limit: int) -> tuple[list[str], str]:
        """Up to ``limit`` IDs of the batch's final jobs after ``cursor`` (None: the first),
        shard after shard, and the cursor that continues after them."""
        positions = decode_cursor(cursor, len(self.shards))
        ids: list[str] = []
        for shard, store in enumerate(self.shards):
            if len(ids) >= limit:
                break
            found = store.batch_ids(batch_id, positions[shard], limit - len(ids), final=True)
            positions[shard] += len(found)
            ids += found
        return ids, encode_cursor(positions)

    def batch_job_ids(self, batch_id: str, page: int = 10_000) -> Iterator[list[str]]:
        """Every job ID of the batch, a page at a time, shard after shard."""
        for store in self.shards:
            start = 0
            while found := store.batch_ids(batch_id, start, page, final=False):
                yield found
                start += len(found)

    def _routed(
        self,
        items: Sequence[T],
        job_id: Callable[[T], str],
        call: Callable[[JobStore, Sequence[T]], Sequence[Any]],
    ) -> list[Any]:
        """``call`` once per shard on that shard's items; the answers back in input order."""
        if len(self.shards) == 1:
            return list(call(self.shards[0], items)) if items else []
        groups: dict[int, list[int]] = {}
        for position, item in enumerate(items):
            groups.setdefault(shard_of(job_id(item), len(self.shards)), []).append(position)
        results: list[Any] = [None] * len(items)
        for shard, positions in groups.items():
            answers = call(self.shards[shard], [items[p] for p in positions])
            for position, answer in zip(positions, answers, strict=True):
                results[position] = answer
        return results
