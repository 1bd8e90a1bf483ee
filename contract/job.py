"""The job record as every reader sees it: the ``Job`` dataclass and its JSON form.

The ``Job`` dataclass is the schema: its fields are the JSON document's keys, in order, each
always present (``null`` where it does not apply yet), and each field's ``doc`` says what it
holds. ``to_dict``, ``from_dict`` and the gateway's response model are derived from it. Redis
keeps a compact form of it (``contract.record``); ``JobStore`` reads it back as a ``Job``.
"""

from __future__ import annotations

import json
import math
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
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    def __str__(self) -> str:
        return self.value


QUEUED = JobStatus.QUEUED
RUNNING = JobStatus.RUNNING
DONE = JobStatus.DONE
FAILED = JobStatus.FAILED
CANCELLED = JobStatus.CANCELLED
EXPIRED = JobStatus.EXPIRED
STATUSES = tuple(JobStatus)

# The job state machine: the statuses a record may move to from each status. Claiming moves a
# job to running (again after a worker died), fails it as a poison pill, or expires it when its
# deadline passed before it started; finishing writes done or failed over any status that is not
# final; cancelling ends a queued or running job (a running job's result is then discarded).
# contract.store's Lua scripts are checked against this table by tests/test_state_machine.py.
TRANSITIONS: Mapping[JobStatus, frozenset[JobStatus]] = {
    QUEUED: frozenset({RUNNING, DONE, FAILED, CANCELLED, EXPIRED}),
    RUNNING: frozenset({RUNNING, DONE, FAILED, CANCELLED, EXPIRED}),
    DONE: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
    EXPIRED: frozenset(),
}
# Statuses a job never leaves.
FINAL = frozenset(status for status, after in TRANSITIONS.items() if not after)


class Priority(str, Enum):
    """How soon a job is served: each model's workers take high before normal before low."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    def __str__(self) -> str:
        return self.value


# Served first to last: the order in which a worker consumes its queues.
PRIORITIES = (Priority.HIGH, Priority.NORMAL, Priority.LOW)

URI_SCHEMES = ("s3://", "http://", "https://", "file://")
# Whole-string patterns, also published in the HTTP API's schema.
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"
# Model names are 1 to 100 characters; versions 1 to 64.
MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
# An http(s) URL without control characters or spaces.
CALLBACK_URL_PATTERN = r"^[hH][tT][tT][pP][sS]?://[^\x00-\x20\x7f]+$"
_JOB_ID = re.compile(JOB_ID_PATTERN.rstrip("$"))
_MODEL = re.compile(MODEL_PATTERN.rstrip("$"))
_CALLBACK_URL = re.compile(CALLBACK_URL_PATTERN.rstrip("$"))
# A batch's output: s3://... or a path that does not start with another scheme.
_NO_CTL = r"\x00-\x1f\x7f"
OUTPUT_PATTERN = (
    "^(?:"
    + "|".join(
        (
            rf"[^A-Za-z{_NO_CTL}][^{_NO_CTL}]*",  # starts with no letter
            # starts with a word that is not followed by "://" (so not a scheme)
            rf"[A-Za-z][A-Za-z0-9+.-]*(?:$|[^A-Za-z0-9+.:{_NO_CTL}-]|:$|:[^/{_NO_CTL}]|:/$"
            rf"|:/[^/{_NO_CTL}])[^{_NO_CTL}]*",
            rf"[sS]3://[^{_NO_CTL}]*",  # S3
        )
    )
    + ")$"
)
_OUTPUT = re.compile(OUTPUT_PATTERN.rstrip("$"))
# A model name, optionally pinned to one version: ``name@version``.
MODEL_REF_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}(@[A-Za-z0-9]{1,64})?$"
_VERSION = re.compile(r"[A-Za-z0-9]{1,64}")
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
    model: str = field(metadata=_doc("model name; with version, names the Celery queue"))
    top_k: int = field(metadata=_doc("labels wanted, 1..MAX_TOP_K"))
    callback_url: str | None = field(
        default=None,
        metadata=_doc("http(s) URL that receives the final record as a signed webhook, or null"),
    )
    version: str | None = field(
        default=None, metadata=_doc("the model version the job was checked against and queued for")
    )
    priority: Priority = field(
        default=Priority.NORMAL, metadata=_doc("high | normal | low: served high first")
    )
    batch: str | None = field(
        default=None,
        metadata=_doc("the batch the job was submitted in (GET /v1/batches/{batch}), or null"),
    )
    deadline: float | None = field(
        default=None,
        metadata=_doc("unix seconds: not started by then, it ends expired unrun; or null"),
    )
    ttl_s: int = field(
        default=defaults.JOB_TTL_S,
        metadata=_doc("seconds the record is kept once the job is final"),
    )
    status: JobStatus = field(
        default=QUEUED,
        metadata=_doc("queued -> running -> done | failed; or cancelled, or expired (deadline)"),
    )
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
            if "priority" in scalars:
                scalars["priority"] = _priority(scalars["priority"])
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
            finished=timestamp(now),
            predictions=tuple(predictions),
            weights=weights,
            random_weights=random_weights,
            error=None,
        )

    def failed(self, error: ErrorInfo, now: float) -> Job:
        return replace(self, status=FAILED, finished=timestamp(now), error=error, predictions=None)


def timestamp(seconds: float) -> float:
    """``seconds`` to the microsecond, the precision a stored record keeps: a job read back then
    equals the one written."""
    return round(seconds * 1_000_000) / 1_000_000


# Every field but the two nested ones, in schema order; to_dict writes those two itself.
_SCALARS = tuple(f.name for f in fields(Job) if f.name not in ("predictions", "error"))
_scalars = attrgetter(*_SCALARS)


def _status(value: object) -> JobStatus:
    try:
        return JobStatus(value)
    except ValueError:
        raise MalformedRecord(f"job record has unknown status {value!r}") from None


def _priority(value: object) -> Priority:
    try:
        return Priority(value)
    except ValueError:
        raise MalformedRecord(f"job record has unknown priority {value!r}") from None


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
    return _validate_id(job_id, "job ID")


def validate_batch_id(batch_id: str) -> str:
    """A batch ID follows the job ID's rule."""
    return _validate_id(batch_id, "batch ID")


def _validate_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{what} must be a non-empty string")
    _check_utf8(value, what)
    if len(value) > defaults.MAX_JOB_ID_LEN or not _JOB_ID.fullmatch(value):
        raise InvalidRequest(
            f"{what} {value[:40]!r} must be at most {defaults.MAX_JOB_ID_LEN} characters of "
            "letters, digits, '.', '_', ':' and '-', starting with a letter or digit"
        )
    return value


def validate_output(output: str) -> str:
    """A batch's results sink: ``s3://bucket/prefix/`` or a local directory. Only the form is
    checked here; the sink decides where it may write (its root, its buckets) and records why
    it could not in the batch's ``output_error``."""
    if not isinstance(output, str) or not _OUTPUT.fullmatch(output) or not output:
        raise InvalidRequest(
            f"output must be s3://bucket/prefix/ or a directory, of at most "
            f"{defaults.MAX_URI_LEN} characters without control characters, got {output!r:.60}"
        )
    if len(output) > defaults.MAX_URI_LEN:
        raise InvalidRequest(f"output is longer than {defaults.MAX_URI_LEN} characters")
    _check_utf8(output, "output")
    return output


def validate_model_name(model: str) -> str:
    if not isinstance(model, str) or not _MODEL.fullmatch(model):
        raise InvalidRequest(f"model name {model!r} is not a valid name")
    return model


def validate_priority(priority: str) -> Priority:
    try:
        return Priority(priority)
    except ValueError:
        names = " | ".join(p.value for p in PRIORITIES)
        raise InvalidRequest(f"priority must be one of {names}, got {priority!r}") from None


def parse_model_ref(ref: str) -> tuple[str, str | None]:
    """``name`` or ``name@version`` as (name, version or None), both validated."""
    if not isinstance(ref, str):
        raise InvalidRequest(f"model {ref!r} is not a valid name")
    name, at, version = ref.partition("@")
    validate_model_name(name)
    if at and not _VERSION.fullmatch(version):
        raise InvalidRequest(
            f"model version {version[:40]!r} must be 1 to 64 letters and digits (name@version)"
        )
    return name, version if at else None


def validate_model_ref(ref: str) -> str:
    """``name`` or ``name@version``, unchanged once valid."""
    parse_model_ref(ref)
    return ref


def validate_top_k(top_k: int, num_classes: int | None = None) -> int:
    upper = defaults.MAX_TOP_K if num_classes is None else min(defaults.MAX_TOP_K, num_classes)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= upper:
        raise InvalidRequest(f"top_k must be an integer from 1 to {upper}, got {top_k!r}")
    return top_k


def validate_ttl_s(ttl_s: int) -> int:
    """Seconds a record is kept once final: 1 to ``defaults.MAX_TTL_S``."""
    if (
        isinstance(ttl_s, bool)
        or not isinstance(ttl_s, int)
        or not 1 <= ttl_s <= defaults.MAX_TTL_S
    ):
        raise InvalidRequest(
            f"ttl_s must be an integer from 1 to {defaults.MAX_TTL_S} seconds, got {ttl_s!r}"
        )
    return ttl_s


def validate_deadline(deadline: float) -> float:
    """A deadline in Unix seconds: a finite positive number (one already past is allowed: the
    job then ends expired at its claim)."""
    if isinstance(deadline, bool) or not isinstance(deadline, int | float):
        raise InvalidRequest(f"deadline must be a number of Unix seconds, got {deadline!r}")
    if not math.isfinite(deadline) or not 0 < deadline <= defaults.MAX_DEADLINE:
        raise InvalidRequest(
            f"deadline must be a positive Unix time in seconds (not milliseconds), "
            f"at most {defaults.MAX_DEADLINE:.0f}, got {deadline!r}"
        )
    return timestamp(deadline)


def validate_callback_url(url: str) -> str:
    """Check a webhook URL's form; the sender refuses private addresses when it resolves them."""
    if not isinstance(url, str) or not _CALLBACK_URL.fullmatch(url):
        raise InvalidRequest(
            f"callback_url must be an http:// or https:// URL without spaces or control "
            f"characters, got {url!r:.60}"
        )
    if len(url) > defaults.MAX_URI_LEN:
        raise InvalidRequest(f"callback_url is longer than {defaults.MAX_URI_LEN} characters")
    _check_utf8(url, "callback_url")
    return url


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
