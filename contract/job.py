"""The job record as every reader sees it: the ``Job`` dataclass and its JSON form.

The ``Job`` dataclass is the schema: its fields are the JSON document's keys, in order, each
always present (``null`` where it does not apply yet), and each field's ``doc`` says what it
holds. ``to_dict``, ``from_dict`` and the gateway's response model are derived from it. Redis
keeps a compact form of it (``contract.record``); ``JobStore`` reads it back as a ``Job``.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from operator import attrgetter
from typing import Any

from contract import defaults
from contract.errors import InvalidRequest, MalformedRecord


class JobStatus(str, Enum):
    """A job's status; the value is what the record stores."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


QUEUED = JobStatus.QUEUED
RUNNING = JobStatus.RUNNING
DONE = JobStatus.DONE
FAILED = JobStatus.FAILED
STATUSES = tuple(JobStatus)

# The job state machine: the statuses a record may move to from each status. Claiming moves a
# job to running (again after a worker died), or fails it as a poison pill; finishing writes
# done or failed over any status that is not final. contract.store's Lua scripts are checked
# against this table by tests/test_contract.py.
TRANSITIONS: Mapping[JobStatus, frozenset[JobStatus]] = {
    QUEUED: frozenset({RUNNING, DONE, FAILED}),
    RUNNING: frozenset({RUNNING, DONE, FAILED}),
    DONE: frozenset(),
    FAILED: frozenset(),
}
# Statuses a job never leaves.
FINAL = frozenset(status for status, after in TRANSITIONS.items() if not after)

URI_SCHEMES = ("s3://", "http://", "https://", "file://")
# Whole-string patterns, also published in the HTTP API's schema.
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"
MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
_JOB_ID = re.compile(JOB_ID_PATTERN.rstrip("$"))
_MODEL = re.compile(MODEL_PATTERN.rstrip("$"))
# A URI's scheme, when it has one: group 1 is the scheme without "://".
URI_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _doc(text: str) -> dict[str, str]:
    """A field's description; the gateway's schema shows it."""
    return {"doc": text}


@dataclass(frozen=True)
class Prediction:
    label: str = field(metadata=_doc("the class's label, from the model's weights"))
    index: int = field(metadata=_doc("the class's index in the model's output"))
    probability: float = field(metadata=_doc("softmax probability, 0..1"))


@dataclass(frozen=True)
class ErrorInfo:
    """Why a job failed: a ``contract.errors`` wire type and a message for people."""

    type: str = field(metadata=_doc("wire type of a contract.errors.ServiceError"))
    message: str = field(metadata=_doc("what went wrong, for people"))


@dataclass(frozen=True)
class Job:
    id: str = field(metadata=_doc("client-supplied or generated (uuid4 hex)"))
    uri: str = field(metadata=_doc("local path, s3://bucket/key or http(s)://..."))
    model: str = field(metadata=_doc("model name; also names the Celery queue"))
    top_k: int = field(metadata=_doc("labels wanted, 1..MAX_TOP_K"))
    status: JobStatus = field(default=QUEUED, metadata=_doc("queued -> running -> done | failed"))
    submitted: float | None = field(default=None, metadata=_doc("unix seconds"))
    started: float | None = field(
        default=None, metadata=_doc("unix seconds of the latest start, or null")
    )
    finished: float | None = field(default=None, metadata=_doc("unix seconds, or null"))
    attempts: int = field(default=0, metadata=_doc("deliveries that started work on the job"))
    worker: str | None = field(
        default=None, metadata=_doc("the worker that last started it, or null")
    )
    weights: str | None = field(
        default=None, metadata=_doc("weights identifier of the model that answered, or null")
    )
    random_weights: bool | None = field(
        default=None,
        metadata=_doc("true when the model had random weights: its predictions mean nothing"),
    )
    predictions: tuple[Prediction, ...] | None = field(
        default=None, metadata=_doc("sorted by probability, descending, or null")
    )
    error: ErrorInfo | None = field(default=None, metadata=_doc("why it failed, else null"))

    @property
    def is_final(self) -> bool:
        return self.status in FINAL

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict, which deep-copies: this runs for every job on the hot path.
        data = dict(zip(_SCALARS, _scalars(self), strict=True))
        data["predictions"] = (
            None
            if self.predictions is None
            else [
                {"label": p.label, "index": p.index, "probability": p.probability}
                for p in self.predictions
            ]
        )
        data["error"] = (
            None if self.error is None else {"type": self.error.type, "message": self.error.message}
        )
        return data

    def encode(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        try:
            preds = data.get("predictions")
            err = data.get("error")
            scalars = {k: data[k] for k in _SCALARS if k in data}
            if "status" in scalars:
                scalars["status"] = _status(scalars["status"])
            return cls(
                **scalars,
                predictions=None if preds is None else tuple(Prediction(**p) for p in preds),
                error=None if err is None else ErrorInfo(**err),
            )
        except (TypeError, KeyError) as e:
            raise MalformedRecord(f"job record does not follow the schema: {e}") from e

    @classmethod
    def decode(cls, raw: str | bytes) -> Job:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise MalformedRecord(f"job record is not JSON: {e}") from e
        if not isinstance(data, dict):
            raise MalformedRecord("job record is not a JSON object")
        return cls.from_dict(data)

    def done(
        self, predictions: list[Prediction], weights: str, random_weights: bool, now: float
    ) -> Job:
        return replace(
            self,
            status=DONE,
            finished=now,
            predictions=tuple(predictions),
            weights=weights,
            random_weights=random_weights,
            error=None,
        )

    def failed(self, error: ErrorInfo, now: float) -> Job:
        return replace(self, status=FAILED, finished=now, error=error, predictions=None)


# Every field but the two nested ones, in schema order; to_dict writes those two itself.
_SCALARS = tuple(f.name for f in fields(Job) if f.name not in ("predictions", "error"))
_scalars = attrgetter(*_SCALARS)


def _status(value: object) -> JobStatus:
    try:
        return JobStatus(value)
    except ValueError:
        raise MalformedRecord(f"job record has unknown status {value!r}") from None


def new_job_id() -> str:
    return uuid.uuid4().hex


def _check_utf8(text: str, what: str) -> None:
    """Refuse text Redis and JSON cannot carry: lone surrogates, e.g. a file name that was not
    UTF-8 (os.fsdecode turns its bytes into surrogate escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        shown = text[:40].encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
        raise InvalidRequest(
            f"{what} {shown!r} is not valid UTF-8 (character {e.start}); "
            "give the name as UTF-8 text"
        ) from e


def validate_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not job_id:
        raise InvalidRequest("job ID must be a non-empty string")
    _check_utf8(job_id, "job ID")
    if len(job_id) > defaults.MAX_JOB_ID_LEN or not _JOB_ID.fullmatch(job_id):
        raise InvalidRequest(
            f"job ID {job_id[:40]!r} must be at most {defaults.MAX_JOB_ID_LEN} characters of "
            "letters, digits, '.', '_', ':' and '-', starting with a letter or digit"
        )
    return job_id


def validate_model_name(model: str) -> str:
    if not isinstance(model, str) or not _MODEL.fullmatch(model) or len(model) > 100:
        raise InvalidRequest(f"model name {model!r} is not a valid name")
    return model


def validate_top_k(top_k: int, num_classes: int | None = None) -> int:
    upper = defaults.MAX_TOP_K if num_classes is None else min(defaults.MAX_TOP_K, num_classes)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= upper:
        raise InvalidRequest(f"top_k must be an integer from 1 to {upper}, got {top_k!r}")
    return top_k


def validate_uri(uri: str) -> str:
    """Check the URI's form; whether it may be read is decided by the worker's fetch policy."""
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidRequest("uri must be a non-empty string")
    if len(uri) > defaults.MAX_URI_LEN:
        raise InvalidRequest(f"uri is longer than {defaults.MAX_URI_LEN} characters")
    if "\x00" in uri:
        raise InvalidRequest("uri contains a NUL byte")
    _check_utf8(uri, "uri")
    scheme = URI_SCHEME.match(uri)
    if scheme and f"{scheme.group(1).lower()}://" not in URI_SCHEMES:
        raise InvalidRequest(f"uri scheme of {uri[:40]!r} is not one of {', '.join(URI_SCHEMES)}")
    return uri
