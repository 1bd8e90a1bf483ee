"""How a ``Job`` is stored in Redis: one packed string, cheap to keep, write, claim and read.

A finished top-5 record took 856 bytes of Redis memory as JSON and 280-312 as a hash; this form
takes 248 (MEMORY USAGE, a 68-character path, a version). The value is a fixed-width header the
store's Lua scripts read and rewrite in place (GET, SETRANGE), then tagged fields:

====== ===== ===========================================================================
offset bytes header field
====== ===== ===========================================================================
0      1     format: ``FORMAT``; anything else is not a record of this release
1      1     status code (``STATUS_CODES``)
2      2     attempts, unsigned
4      7     started: microseconds since the epoch, unsigned (``NO_TIME`` when not yet)
11     4     who answered (or claimed): a ``Catalog`` ID (``NO_WHO`` when nobody yet)
15     7     finished, as started
22     7     submitted, as started
29     2     top_k, unsigned
31     1     priority code (``PRIORITY_CODES``)
32     1     flags: which optional fixed-width fields follow the header, in this order:
             ``HAS_DEADLINE`` a deadline (7 bytes, as started), ``HAS_TTL`` seconds the record
             is kept once final (4 bytes, unsigned; without it ``defaults.JOB_TTL_S``)
====== ===== ===========================================================================

Integers are little-endian. Each tagged field is its tag (one byte), its length (LEB128) and
its bytes: the URI, the model, and where they apply the version, the callback URL, packed
predictions and the error. A field a record lacks does not apply; a later field with the same
tag replaces an earlier one (a script fails a job by appending its error).

What many records share is stored once and referred to by a short ID (``Catalog``): who
answered (the worker, its weights, random or not), and the labels of those weights, looked up
by class index when a record is read. Predictions are the class index and the float32
probability the model computed. The record's key holds its ID.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from contract import defaults
from contract.errors import MalformedRecord
from contract.job import (
    CANCELLED,
    DONE,
    EXPIRED,
    FAILED,
    QUEUED,
    RUNNING,
    ErrorInfo,
    Job,
    JobStatus,
    Prediction,
    Priority,
)

FORMAT = b"\x01"
# Header offsets (0-based) and widths the store's scripts use.
STATUS_AT = 1
ATTEMPTS_AT = 2
STARTED_AT = 4
WHO_AT = 11
FINISHED_AT = 15
TIME_BYTES = 7
HEADER_BYTES = 33
NO_TIME = (1 << 56) - 1
NO_WHO = 0xFFFFFFFF  # Catalog IDs are 31-bit

_HEAD = struct.Struct("<ccH7sI7s7sHcB")
assert _HEAD.size == HEADER_BYTES
# The claim script rewrites status, attempts, started and who with one SETRANGE, and a poison
# pill's status through finished with another: they lie in that order, each after the last.
assert (ATTEMPTS_AT, STARTED_AT, WHO_AT, FINISHED_AT) == (
    STATUS_AT + 1,
    ATTEMPTS_AT + 2,
    STARTED_AT + TIME_BYTES,
    WHO_AT + 4,
)

FLAGS_AT = 32
HAS_DEADLINE, HAS_TTL = 1, 2
TTL_BYTES = 4
assert FLAGS_AT == HEADER_BYTES - 1

STATUS_CODES: Mapping[JobStatus, bytes] = {
    QUEUED: b"q",
    RUNNING: b"r",
    DONE: b"d",
    FAILED: b"f",
    CANCELLED: b"c",
    EXPIRED: b"x",
}
_STATUS_OF = {code: status for status, code in STATUS_CODES.items()}
PRIORITY_CODES: Mapping[Priority, bytes] = {
    Priority.HIGH: b"h",
    Priority.NORMAL: b"n",
    Priority.LOW: b"l",
}
_PRIORITY_OF = {code: priority for priority, code in PRIORITY_CODES.items()}

# Tags of the fields after the header.
URI = ord("u")
MODEL = ord("m")
VERSION = ord("v")  # the model version it was queued for, when known
CALLBACK_URL = ord("c")  # only when the job has one
BATCH = ord("g")  # the batch's ID, only when the job is in one
PREDICTIONS = ord("p")  # packed, see pack_predictions
ERROR = ord("e")  # "<type>:<message>"

# The first byte of packed predictions says the width of each class index.
_NARROW, _WIDE = b"h", b"i"
_ENTRY = {_NARROW: struct.Struct("<Hf"), _WIDE: struct.Struct("<If")}


def micros(seconds: float) -> int:
    return round(seconds * 1_000_000)


@functools.lru_cache(maxsize=4096)
def name_id(text: str) -> int:
    """The catalog ID of ``text``: a 31-bit hash, so that every process derives the same one
    without asking Redis, and a Redis that lost its catalog gets the same IDs written again."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "big") >> 1


@functools.lru_cache(maxsize=1024)
def who_text(worker: str | None, weights: str | None, random_weights: bool | None) -> str:
    """Who answered a job: the worker and what it ran; one per worker process and model."""
    return json.dumps([worker, weights, random_weights], separators=(",", ":"))


@functools.lru_cache(maxsize=1024)
def answerer_id(weights: str | None, random_weights: bool | None) -> int:
    """What answered (its labels are kept under this ID): the same for every worker. Cached:
    every record read and written asks."""
    return name_id(json.dumps([weights, random_weights], separators=(",", ":")))


def claimed_by(worker: str) -> str:
    """The ``who`` text of a job ``worker`` is running: it has not answered yet."""
    return who_text(worker, None, None)


def pack_predictions(predictions: Sequence[Prediction]) -> bytes:
    wide = any(p.index > 0xFFFF for p in predictions)
    kind = _WIDE if wide else _NARROW
    entry = _ENTRY[kind]
    return kind + b"".join(entry.pack(p.index, p.probability) for p in predictions)


def unpack_predictions(packed: bytes) -> list[tuple[int, float]]:
    """(index, probability) pairs; a float32 shown with the 7 digits it holds."""
    entry = _ENTRY.get(packed[:1])
    if entry is None or (len(packed) - 1) % entry.size:
        raise MalformedRecord("job record has unreadable predictions")
    return [(i, float(f"{p:.7g}")) for i, p in entry.iter_unpack(packed[1:])]


def field(tag: int, value: bytes) -> bytes:
    """One tagged field: the tag, the length (LEB128), the value."""
    n = len(value)
    if n < 0x80:
        return bytes((tag, n)) + value
    size = bytearray((tag,))
    while n >= 0x80:
        size.append(0x80 | (n & 0x7F))
        n >>= 7
    size.append(n)
    return bytes(size) + value


def encode(job: Job, catalog: Catalog) -> bytes:
    """The stored form of ``job``; names and labels it refers to are noted in ``catalog``."""
    who = NO_WHO
    if job.worker is not None or job.weights is not None or job.random_weights is not None:
        who = catalog.who(job)
    flags, optional = _optional(job)
    head = _HEAD.pack(
        FORMAT,
        STATUS_CODES[job.status],
        job.attempts,
        _time(job.started),
        who,
        _time(job.finished),
        _time(job.submitted),
        job.top_k,
        PRIORITY_CODES[job.priority],
        flags,
    )
    parts = [head, *optional, field(URI, _bytes(job.uri)), field(MODEL, _bytes(job.model))]
    if job.version is not None:
        parts.append(field(VERSION, _bytes(job.version)))
    if job.callback_url is not None:
        parts.append(field(CALLBACK_URL, _bytes(job.callback_url)))
    if job.batch is not None:
        parts.append(field(BATCH, _bytes(job.batch)))
    if job.predictions is not None:
        parts.append(field(PREDICTIONS, pack_predictions(job.predictions)))
    if job.error is not None:
        parts.append(field(ERROR, _bytes(f"{job.error.type}:{job.error.message}")))
    return b"".join(parts)


def _optional(job: Job) -> tuple[int, list[bytes]]:
    """The header's flags and the optional fixed-width fields after it."""
    flags, fields = 0, []
    if job.deadline is not None:
        flags |= HAS_DEADLINE
        fields.append(_time(job.deadline))
    if job.ttl_s != defaults.JOB_TTL_S:
        flags |= HAS_TTL
        fields.append(job.ttl_s.to_bytes(TTL_BYTES, "little"))
    return flags, fields


def _bytes(text: str) -> bytes:
    # surrogateescape: a name that was not UTF-8 is kept as the bytes it was.
    return text.encode("utf-8", "surrogateescape")


def _time(seconds: float | None) -> bytes:
    return (NO_TIME if seconds is None else micros(seconds)).to_bytes(TIME_BYTES, "little")


@dataclass(frozen=True)
class Stored:
    """One record as read: its header's values and its tagged fields."""

    job_id: str
    head: tuple[bytes, bytes, int, bytes, int, bytes, bytes, int, bytes, int]
    fields: Mapping[int, bytes]
    deadline: bytes | None = None
    ttl_s: int = defaults.JOB_TTL_S

    def get(self, tag: int) -> bytes | None:
        return self.fields.get(tag)

    def who(self) -> int | None:
        who = self.head[4]
        return None if who == NO_WHO else who

    def status_code(self) -> bytes:
        return self.head[1]


def stored(job_id: str, raw: bytes) -> Stored:
    """``raw``, a record's value, split into its header and fields."""
    if raw[:1] != FORMAT or len(raw) < HEADER_BYTES:
        raise MalformedRecord(_not_a_record(job_id, raw))
    try:
        head = _HEAD.unpack_from(raw)
        at, deadline, ttl_s = HEADER_BYTES, None, defaults.JOB_TTL_S
        if head[9] & HAS_DEADLINE:
            deadline, at = raw[at : at + TIME_BYTES], at + TIME_BYTES
        if head[9] & HAS_TTL:
            ttl_s, at = int.from_bytes(raw[at : at + TTL_BYTES], "little"), at + TTL_BYTES
        return Stored(job_id, head, _fields(raw, at), deadline, ttl_s)
    except (IndexError, struct.error) as e:
        raise MalformedRecord(f"job record {job_id!r} is cut short: {e}") from e


def _not_a_record(job_id: str, raw: bytes) -> str:
    return (
        f"job record {job_id!r} is not in this release's format (it starts {raw[:12]!r}): "
        "records written before the packed format (issue 10) cannot be read; let them expire"
    )


def _fields(raw: bytes, at: int) -> dict[int, bytes]:
    fields = {}
    end = len(raw)
    while at < end:
        tag, n = raw[at], raw[at + 1]
        at += 2
        if n & 0x80:
            n, at = _long_size(raw, at - 1)
        if at + n > end:
            raise IndexError(f"field {chr(tag)!r} runs past the end")
        fields[tag] = raw[at : at + n]
        at += n
    return fields


def _long_size(raw: bytes, at: int) -> tuple[int, int]:
    """A LEB128 length starting at ``at``: its value, and where the value after it starts."""
    n = shift = 0
    while True:
        byte = raw[at]
        n |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return n, at
        shift += 7


def decode(record: Stored, catalog: Catalog) -> Job:
    """The ``Job`` a stored record holds; names and labels come from ``catalog``."""
    try:
        return _job(record, catalog)
    except (ValueError, KeyError, TypeError) as e:
        raise MalformedRecord(
            f"job record {record.job_id!r} does not follow the schema: {e}"
        ) from e


def _job(record: Stored, catalog: Catalog) -> Job:
    _, status, attempts, started, _, finished, submitted, top_k, priority, _ = record.head
    get = record.get
    model = _text(get(MODEL))
    worker, weights, random_weights = catalog.who_of(record.who())
    return Job(
        id=record.job_id,
        uri=_text(_required(record, URI)),
        model=model,
        top_k=top_k,
        callback_url=_optional_text(get(CALLBACK_URL)),
        batch=_optional_text(get(BATCH)),
        version=_optional_text(get(VERSION)),
        priority=_PRIORITY_OF[priority],
        deadline=None if record.deadline is None else _seconds(record.deadline),
        ttl_s=record.ttl_s,
        status=_STATUS_OF[status],
        submitted=_seconds(submitted),
        started=_seconds(started),
        finished=_seconds(finished),
        attempts=attempts,
        worker=worker,
        weights=weights,
        random_weights=random_weights,
        predictions=_predictions(get(PREDICTIONS), model, weights, random_weights, catalog),
        error=_error(get(ERROR)),
    )


def _required(record: Stored, tag: int) -> bytes:
    value = record.get(tag)
    if value is None:
        raise KeyError(f"no field {chr(tag)!r}")
    return value


def _predictions(
    packed: bytes | None,
    model: str,
    weights: str | None,
    random_weights: bool | None,
    catalog: Catalog,
) -> tuple[Prediction, ...] | None:
    if packed is None:
        return None
    labels = catalog.labels(model, answerer_id(weights, random_weights))
    return tuple(Prediction(labels.get(i, ""), i, p) for i, p in unpack_predictions(packed))


def _error(raw: bytes | None) -> ErrorInfo | None:
    if raw is None:
        return None
    kind, _, message = _text(raw).partition(":")
    return ErrorInfo(kind, message)


def _text(raw: bytes | None) -> str:
    # surrogateescape: a record written before names were checked for UTF-8 still reads.
    return "" if raw is None else raw.decode("utf-8", "surrogateescape")


def _optional_text(raw: bytes | None) -> str | None:
    return None if raw is None else _text(raw)


def _seconds(raw: bytes) -> float | None:
    micros_ = int.from_bytes(raw, "little")
    return None if micros_ == NO_TIME else micros_ / 1_000_000


class Catalog:
    """Texts many records share, by short ID (who answered), and the labels of what answered.

    Read from Redis once per process and cached (an ID always means the same text). Writers say
    what they referred to with ``name`` and ``who``; ``take_pending`` hands the ones not written
    yet to the caller's pipeline, ``written`` marks them done. A label missing from Redis (lost
    with its data) reads as "".
    """

    def __init__(self) -> None:
        self._texts: dict[int, str] = {}
        self._labels: dict[tuple[str, int], dict[int, str]] = {}
        self._unwritten_names: dict[int, str] = {}
        self._unwritten_labels: dict[tuple[str, int], dict[int, str]] = {}
        self._written: set[tuple[str, int, int] | int] = set()
        self._who: dict[int, tuple[str | None, str | None, bool | None]] = {}

    def name(self, text: str) -> int:
        ident = name_id(text)
        self._texts[ident] = text
        if ident not in self._written:
            self._unwritten_names[ident] = text
        return ident

    def who(self, job: Job) -> int:
        """The ID of who answered ``job``; notes the labels of its predictions."""
        answerer = answerer_id(job.weights, job.random_weights)
        for p in job.predictions or ():
            if (job.model, answerer, p.index) not in self._written:
                self._unwritten_labels.setdefault((job.model, answerer), {})[p.index] = p.label
        return self.name(who_text(job.worker, job.weights, job.random_weights))

    def take_pending(self) -> tuple[dict[int, str], dict[tuple[str, int], dict[int, str]]]:
        """Names and labels referred to but not written yet by this process, handed over."""
        names, labels = self._unwritten_names, self._unwritten_labels
        self._unwritten_names, self._unwritten_labels = {}, {}
        return names, labels

    def written(
        self, names: Mapping[int, str], labels: Mapping[tuple[str, int], Mapping[int, str]]
    ) -> None:
        """These names and labels are in Redis now."""
        self._written.update(names)
        for (model, ident), by_index in labels.items():
            self._labels.setdefault((model, ident), {}).update(by_index)
            self._written.update((model, ident, i) for i in by_index)

    def forget_written(self) -> None:
        """Write everything again on next use: Redis may have lost it (a restart)."""
        self._written.clear()

    def unknown_names(self, records: Iterable[Stored]) -> set[int]:
        return {i for r in records if (i := r.who()) is not None and i not in self._texts}

    def unknown_labels(self, records: Iterable[Stored]) -> set[tuple[str, int]]:
        """Label sets ``records`` need that this process has not read (their names known)."""
        wanted: set[tuple[str, int]] = set()
        for record in records:
            packed = record.get(PREDICTIONS)
            if packed is None:
                continue
            _, weights, random_weights = self.who_of(record.who())
            key = (_text(record.get(MODEL)), answerer_id(weights, random_weights))
            known = self._labels.get(key, {})
            if any(i not in known for i, _ in unpack_predictions(packed)):
                wanted.add(key)
        return wanted

    def learn(
        self, names: Mapping[int, str], labels: Mapping[tuple[str, int], Mapping[int, str]]
    ) -> None:
        self._texts.update(names)
        for key, by_index in labels.items():
            self._labels.setdefault(key, {}).update(by_index)

    def who_of(self, ident: int | None) -> tuple[str | None, str | None, bool | None]:
        """(worker, weights, random_weights) of a ``who`` ID; all None when unknown."""
        if ident is None or ident not in self._texts:
            return None, None, None
        if (who := self._who.get(ident)) is None:
            worker, weights, random_weights = json.loads(self._texts[ident])
            who = self._who[ident] = (worker, weights, random_weights)
        return who

    def labels(self, model: str, answerer: int) -> Mapping[int, str]:
        return self._labels.get((model, answerer), {})
