"""The job record: one JSON document per job, stored under ``keys.job_key(id)``.

Schema (every field always present; ``null`` where it does not apply yet)::

    id          str    client-supplied or generated (uuid4 hex)
    uri         str    local path, s3://bucket/key or http(s)://...
    model       str    model name; also names the Celery queue
    top_k       int    labels wanted, 1..MAX_TOP_K
    status      str    queued -> running -> done | failed
    submitted   float  unix seconds
    started     float  unix seconds of the latest start, or null
    finished    float  unix seconds, or null
    attempts    int    deliveries that started work on the job
    worker      str    the worker that last started it, or null
    weights     str    weights identifier of the model that answered, or null
    random_weights bool  true when the model had random weights: its predictions mean nothing
    predictions [{label, index, probability}] sorted by probability, descending, or null
    error       {type, message} when failed, else null
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from contract import defaults
from contract.errors import DecodeError, InvalidRequest

QUEUED = "queued"
RUNNING = "running"
DONE = "done"
FAILED = "failed"
STATUSES = (QUEUED, RUNNING, DONE, FAILED)
FINAL = (DONE, FAILED)

URI_SCHEMES = ("s3://", "http://", "https://", "file://")
# Whole-string patterns, also published in the HTTP API's schema.
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"
MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
_JOB_ID = re.compile(JOB_ID_PATTERN.rstrip("$"))
_MODEL = re.compile(MODEL_PATTERN.rstrip("$"))
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    probability: float


@dataclass(frozen=True)
class JobError:
    type: str
    message: str


@dataclass(frozen=True)
class Job:
    id: str
    uri: str
    model: str
    top_k: int
    status: str = QUEUED
    submitted: float | None = None
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    worker: str | None = None
    weights: str | None = None
    random_weights: bool | None = None
    predictions: tuple[Prediction, ...] | None = None
    error: JobError | None = field(default=None)

    @property
    def is_final(self) -> bool:
        return self.status in FINAL

    def to_dict(self) -> dict[str, Any]:
        # Written out rather than dataclasses.asdict: this runs for every job on the hot path.
        return {
            "id": self.id,
            "uri": self.uri,
            "model": self.model,
            "top_k": self.top_k,
            "status": self.status,
            "submitted": self.submitted,
            "started": self.started,
            "finished": self.finished,
            "attempts": self.attempts,
            "worker": self.worker,
            "weights": self.weights,
            "random_weights": self.random_weights,
            "predictions": None
            if self.predictions is None
            else [
                {"label": p.label, "index": p.index, "probability": p.probability}
                for p in self.predictions
            ],
            "error": None
            if self.error is None
            else {"type": self.error.type, "message": self.error.message},
        }

    def encode(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        try:
            preds = data.get("predictions")
            err = data.get("error")
            job = cls(
                **{k: data[k] for k in _SCALARS if k in data},
                predictions=None if preds is None else tuple(Prediction(**p) for p in preds),
                error=None if err is None else JobError(**err),
            )
        except (TypeError, KeyError) as e:
            raise DecodeError(f"job record does not follow the schema: {e}") from e
        if job.status not in STATUSES:
            raise DecodeError(f"job record has unknown status {job.status!r}")
        return job

    @classmethod
    def decode(cls, raw: str | bytes) -> Job:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise DecodeError(f"job record is not JSON: {e}") from e
        if not isinstance(data, dict):
            raise DecodeError("job record is not a JSON object")
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

    def failed(self, error: JobError, now: float) -> Job:
        return replace(self, status=FAILED, finished=now, error=error, predictions=None)


_SCALARS = (
    "id",
    "uri",
    "model",
    "top_k",
    "status",
    "submitted",
    "started",
    "finished",
    "attempts",
    "worker",
    "weights",
    "random_weights",
)


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
    scheme = _SCHEME.match(uri)
    if scheme and f"{scheme.group(1).lower()}://" not in URI_SCHEMES:
        raise InvalidRequest(f"uri scheme of {uri[:40]!r} is not one of {', '.join(URI_SCHEMES)}")
    return uri
