"""A batch: the jobs of one submission under one ID, with counters, times and a results sink.

Each store shard keeps a small hash per batch (``keys.batch_key``) that the store's Lua scripts
update in the same call that creates or finishes a job: ``total`` (jobs created), ``final`` and
one counter per final status, ``created`` and ``finished`` (µs), ``ttl``, and what the
submission named (``callback_url``, ``output``); the results sink adds ``written`` and
``output_error``. A set holds the tokens of the submissions still adding jobs (``holds``): the
batch does not finish while any remains. Two lists hold the batch's job IDs, in submission order
(``jobs``) and in the order they became final (``results``): a results cursor is a position in
the latter, one per shard; the former is dropped when the batch finishes (it is only needed to
cancel it). When a batch finishes, the events stream gets an entry of its own: an empty ``id``,
status ``batch_finished`` and the batch's ID. ``Batch`` is what readers get, summed over the
shards.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from contract.errors import InvalidRequest
from contract.job import FINAL

# The ``status`` of the completion event a batch adds (with an empty ``id``) when it finishes.
BATCH_FINISHED = "batch_finished"
# The hold of submissions that keep a batch open for more (``keep_open``), until it is closed.
KEPT_OPEN = "kept-open"


def new_hold() -> str:
    """The hold token of one submission that writes its jobs in several steps."""
    return "s-" + uuid.uuid4().hex[:12]


def new_batch_id() -> str:
    """A generated batch ID: 64 random bits in hex, half a job ID's length, as every record
    and event of the batch carries it."""
    return uuid.uuid4().hex[:16]


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True)
class BatchSpec:
    """What a submission says about its batch; the first submission's callback_url and output
    are kept, later ones only add jobs. ``hold``: more jobs follow, so the batch must not finish
    when those submitted so far are final; it stays open until that hold is released."""

    id: str
    callback_url: str | None = None
    output: str | None = None
    hold: str | None = None

    def fields(self) -> list[str]:
        """The batch hash's fields this spec sets, as name, value pairs."""
        pairs = {"callback_url": self.callback_url, "output": self.output}
        return [x for name, value in pairs.items() if value is not None for x in (name, value)]


@dataclass(frozen=True)
class Batch:
    id: str = field(metadata=_doc("the batch's ID, given at submit or generated"))
    total: int = field(metadata=_doc("jobs submitted in the batch (existing IDs not counted)"))
    pending: int = field(metadata=_doc("jobs not final yet: queued or running"))
    counts: dict[str, int] = field(metadata=_doc("jobs per final status"))
    progress: float = field(metadata=_doc("final jobs / total, 0..1"))
    created: float | None = field(metadata=_doc("unix seconds of the first submission"))
    finished: float | None = field(
        metadata=_doc("unix seconds when the last job became final, or null")
    )
    callback_url: str | None = field(metadata=_doc("the webhook its jobs named, or null"))
    output: str | None = field(
        metadata=_doc("the results sink: s3://bucket/prefix/ or a directory, or null")
    )
    output_written: int = field(metadata=_doc("records the sink has written to the output"))
    output_error: str | None = field(
        metadata=_doc("why the sink could not write to the output, or null")
    )

    @property
    def is_finished(self) -> bool:
        return self.finished is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "total": self.total,
            "pending": self.pending,
            "counts": dict(self.counts),
            "progress": self.progress,
            "created": self.created,
            "finished": self.finished,
            "callback_url": self.callback_url,
            "output": self.output,
            "output_written": self.output_written,
            "output_error": self.output_error,
        }


def from_hashes(batch_id: str, hashes: Sequence[Mapping[str, str]]) -> Batch | None:
    """The batch that the shards' hashes describe together; None when none has it."""
    found = [h for h in hashes if h]
    if not found:
        return None
    total = _sum(found, "total")
    final = _sum(found, "final")
    counts = {status.value: _sum(found, status.value) for status in sorted(FINAL)}
    done = total > 0 and final >= total and all("finished" in h for h in found if _n(h, "total"))
    return Batch(
        id=batch_id,
        total=total,
        pending=max(total - final, 0),
        counts=counts,
        progress=round(final / total, 6) if total else 0.0,
        created=_seconds(min((h["created"] for h in found if "created" in h), default=None)),
        finished=_seconds(max(h["finished"] for h in found if "finished" in h)) if done else None,
        callback_url=_first(found, "callback_url"),
        output=_first(found, "output"),
        output_written=_sum(found, "written"),
        output_error=_first(found, "output_error"),
    )


def _n(h: Mapping[str, str], name: str) -> int:
    return int(h.get(name, 0))


def _sum(hashes: Sequence[Mapping[str, str]], name: str) -> int:
    return sum(_n(h, name) for h in hashes)


def _first(hashes: Sequence[Mapping[str, str]], name: str) -> str | None:
    return next((h[name] for h in hashes if name in h), None)


def _seconds(micros: str | None) -> float | None:
    return None if micros is None else int(micros) / 1_000_000


def encode_cursor(positions: Sequence[int]) -> str:
    """A results cursor: the position reached in each shard's results list."""
    return ".".join(str(p) for p in positions)


def decode_cursor(cursor: str | None, shards: int) -> list[int]:
    """The positions of ``cursor`` (None: the start); refuses one made for another layout."""
    if cursor is None or cursor == "":
        return [0] * shards
    parts = cursor.split(".")
    if len(parts) != shards or not all(p.isdigit() and len(p) < 19 for p in parts):
        raise InvalidRequest(
            f"cursor {cursor[:40]!r} is not one this service gave: give the cursor a results "
            "page answered, or none to start from the beginning"
        )
    return [int(p) for p in parts]
