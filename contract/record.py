"""How a ``Job`` is stored in Redis: a small hash of one-letter fields, cheap to keep and claim.

A finished top-5 record of the JSON form took 856 bytes of Redis memory; this form takes about a
third. What many records share is stored once and referred to by a short ID (``Catalog``): who
answered (the worker, its weights, random or not), and the labels of those weights, which are
looked up by class index when a record is read. Times are integer microseconds: ``submitted``
since the epoch, ``started`` and ``finished`` after ``submitted``. Predictions are packed binary:
the class index and its float32 probability (what the model computed) per class. The record's
key holds its ID. The store's Lua scripts read and write single fields by these names.
"""

from __future__ import annotations

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

URI = "u"
MODEL = "m"
TOP_K = "k"
STATUS = "s"
SUBMITTED = "t"  # microseconds since the epoch
STARTED = "b"  # microseconds after SUBMITTED
FINISHED = "f"  # microseconds after SUBMITTED
ATTEMPTS = "a"
WHO = "w"  # a Catalog ID: [worker, weights, random_weights]
PREDICTIONS = "p"  # packed, see pack_predictions
ERROR = "e"  # "<type>:<message>"
CALLBACK_URL = "c"  # only when the job has one
VERSION = "v"  # the model version it was queued for, when known
PRIORITY = "o"  # only when not normal
DEADLINE = "d"  # microseconds after SUBMITTED, only when the job has one
TTL = "l"  # seconds kept once final, only when not defaults.JOB_TTL_S
# Longest value kept in one field: Redis's default hash-max-listpack-value. One longer value
# turns the whole hash into a hashtable, three times the size, so a longer value (a long URI, an
# error message, many predictions) is kept in pieces: "u", "u1", "u2", ...
PIECE = 64
# Fields a record cannot be run without (its ID is the key).
REQUIRED = (URI, MODEL, TOP_K, STATUS)

STATUS_CODES: Mapping[JobStatus, str] = {
    QUEUED: "q",
    RUNNING: "r",
    DONE: "d",
    FAILED: "f",
    CANCELLED: "c",
    EXPIRED: "x",
}
_STATUS_OF = {code: status for status, code in STATUS_CODES.items()}

# The first byte of packed predictions says the width of each class index.
_NARROW, _WIDE = b"h", b"i"
_ENTRY = {_NARROW: struct.Struct("<Hf"), _WIDE: struct.Struct("<If")}


def micros(seconds: float) -> int:
    return round(seconds * 1_000_000)


def name_id(text: str) -> int:
    """The catalog ID of ``text``: a 31-bit hash, so that every process derives the same one
    without asking Redis, and a Redis that lost its catalog gets the same IDs written again."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "big") >> 1


def who_text(worker: str | None, weights: str | None, random_weights: bool | None) -> str:
    """Who answered a job: the worker and what it ran; one per worker process and model."""
    return json.dumps([worker, weights, random_weights], separators=(",", ":"))


def answerer_id(weights: str | None, random_weights: bool | None) -> int:
    """What answered (its labels are kept under this ID): the same for every worker."""
    return name_id(json.dumps([weights, random_weights], separators=(",", ":")))


def claimed_by(worker: str) -> str:
    """The ``WHO`` text of a job ``worker`` is running: it has not answered yet."""
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


def to_fields(job: Job, catalog: Catalog) -> dict[str, str | int | bytes]:
    """The hash fields of ``job``; absent fields are null (or zero attempts)."""
    base = 0 if job.submitted is None else micros(job.submitted)
    fields: dict[str, str | int | bytes] = {
        URI: job.uri,
        MODEL: job.model,
        TOP_K: job.top_k,
        ATTEMPTS: job.attempts,
    }
    if job.submitted is not None:
        fields[SUBMITTED] = base
    if job.callback_url is not None:
        fields[CALLBACK_URL] = job.callback_url
    if job.version is not None:
        fields[VERSION] = job.version
    if job.priority != Priority.NORMAL:
        fields[PRIORITY] = Priority(job.priority).value
    if job.deadline is not None:
        fields[DEADLINE] = micros(job.deadline) - base
    if job.ttl_s != defaults.JOB_TTL_S:
        fields[TTL] = job.ttl_s
    fields.update(result_fields(job, base, catalog))
    return in_pieces(fields)


def result_fields(job: Job, base: int, catalog: Catalog) -> dict[str, str | int | bytes]:
    """The fields finishing ``job`` writes: its status, which attempt (when, by whom) answered,
    what answered, and its predictions or error."""
    fields: dict[str, str | int | bytes] = {STATUS: STATUS_CODES[JobStatus(job.status)]}
    if job.started is not None:
        fields[STARTED] = micros(job.started) - base
    if job.worker is not None or job.weights is not None or job.random_weights is not None:
        fields[WHO] = catalog.who(job)
    if job.finished is not None:
        fields[FINISHED] = micros(job.finished) - base
    if job.predictions is not None:
        fields[PREDICTIONS] = pack_predictions(job.predictions)
    if job.error is not None:
        fields[ERROR] = f"{job.error.type}:{job.error.message}"
    return in_pieces(fields)


def in_pieces(fields: Mapping[str, str | int | bytes]) -> dict[str, str | int | bytes]:
    """``fields`` with each value longer than ``PIECE`` bytes split over numbered fields."""
    out: dict[str, str | int | bytes] = {}
    for name, value in fields.items():
        raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        if isinstance(raw, int) or len(raw) <= PIECE:
            out[name] = value
            continue
        for n, at in enumerate(range(0, len(raw), PIECE)):
            out[f"{name}{n or ''}"] = raw[at : at + PIECE]
    return out


@dataclass(frozen=True)
class Stored:
    """One record as read: its fields, long values joined again from their pieces."""

    job_id: str
    fields: Mapping[str, bytes]

    def get(self, name: str) -> bytes | None:
        return self.fields.get(name)

    def who(self) -> int | None:
        return _int(self.get(WHO))


def stored(job_id: str, fields: Mapping[bytes, bytes] | Mapping[str, bytes]) -> Stored:
    """``fields`` as HGETALL answers them, with pieces joined."""
    named = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
    whole = {}
    for name, value in named.items():
        if name[1:]:  # a piece after the first: every field's own name is one letter
            continue
        pieces = [value]
        while (more := named.get(f"{name}{len(pieces)}")) is not None:
            pieces.append(more)
        whole[name] = value if len(pieces) == 1 else b"".join(pieces)
    return Stored(job_id, whole)


def from_fields(record: Stored, catalog: Catalog) -> Job:
    """The ``Job`` a stored record holds; names and labels come from ``catalog``."""
    missing = [name for name in REQUIRED if record.get(name) is None]
    if missing:
        raise MalformedRecord(f"job record {record.job_id!r} has no field {missing[0]!r}")
    try:
        return _job(record, catalog)
    except (ValueError, KeyError, TypeError) as e:
        raise MalformedRecord(
            f"job record {record.job_id!r} does not follow the schema: {e}"
        ) from e


def _job(record: Stored, catalog: Catalog) -> Job:
    get = record.get
    model = _text(get(MODEL))
    submitted = _int(get(SUBMITTED))
    base = submitted or 0
    worker, weights, random_weights = catalog.who_of(record.who())
    return Job(
        id=record.job_id,
        uri=_text(get(URI)),
        model=model,
        top_k=int(get(TOP_K)),  # type: ignore[arg-type]
        callback_url=_optional_text(get(CALLBACK_URL)),
        version=_optional_text(get(VERSION)),
        priority=Priority(_text(get(PRIORITY)) or Priority.NORMAL),
        deadline=_seconds(_int(get(DEADLINE)), base),
        ttl_s=_int(get(TTL)) or defaults.JOB_TTL_S,
        status=_STATUS_OF[_text(get(STATUS))],
        submitted=_seconds(submitted, 0),
        started=_seconds(_int(get(STARTED)), base),
        finished=_seconds(_int(get(FINISHED)), base),
        attempts=_int(get(ATTEMPTS)) or 0,
        worker=worker,
        weights=weights,
        random_weights=random_weights,
        predictions=_predictions(get(PREDICTIONS), model, weights, random_weights, catalog),
        error=_error(get(ERROR)),
    )


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


def _int(raw: bytes | None) -> int | None:
    return None if raw is None else int(raw)


def _seconds(micros_: int | None, base: int) -> float | None:
    return None if micros_ is None else (base + micros_) / 1_000_000


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
        """(worker, weights, random_weights) of a ``WHO`` ID; all None when unknown."""
        if ident is None or ident not in self._texts:
            return None, None, None
        worker, weights, random_weights = json.loads(self._texts[ident])
        return worker, weights, random_weights

    def labels(self, model: str, answerer: int) -> Mapping[int, str]:
        return self._labels.get((model, answerer), {})
