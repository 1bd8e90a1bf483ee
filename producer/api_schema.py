"""The gateway's request and response bodies: contract.job's schema as pydantic models.

The models are what the OpenAPI schema shows; contract.job's validators run inside them, so the
gateway refuses exactly what the Python API refuses.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, create_model

from contract import defaults
from contract.batch import Batch
from contract.errors import InvalidRequest
from contract.job import (
    CALLBACK_URL_PATTERN,
    JOB_ID_PATTERN,
    MODEL_REF_PATTERN,
    OUTPUT_PATTERN,
    Job,
    validate_batch_id,
    validate_callback_url,
    validate_job_id,
    validate_model_ref,
    validate_output,
    validate_uri,
)

# Most jobs one POST may carry.
MAX_JOBS_PER_REQUEST = 10_000


def _checked(validate: Callable[[str], str]) -> AfterValidator:
    """Run a contract validator, so that the gateway refuses exactly what the client refuses."""

    def check(value: str) -> str:
        try:
            return validate(value)
        except InvalidRequest as e:
            raise ValueError(str(e)) from e

    return AfterValidator(check)


# contract.job's rules written as schema patterns, so that clients (and schemathesis) can tell
# what is accepted; the contract's validators still decide, and the schemathesis test fails if
# the two drift apart.
URI_PATTERN = (
    "^(?:"
    + "|".join(
        (
            # Spaces as Python's str.strip sees them: \x1c-\x1f too, which \s leaves out
            # in the gateway's (Rust) regex engine.
            r"[^A-Za-z\s\x1c-\x1f\x00][^\x00]*",  # starts with neither a letter nor a space
            r"[\s\x1c-\x1f][^\x00]*[^\s\x1c-\x1f\x00][^\x00]*",  # a space first, not blank
            # starts with a word that is not followed by "://" (so not a scheme)
            r"[A-Za-z][A-Za-z0-9+.-]*(?:$|[^A-Za-z0-9+.:\x00-]|:$|:[^/\x00]|:/$|:/[^/\x00])[^\x00]*",
            r"(?:[sS]3|[hH][tT][tT][pP][sS]?|[fF][iI][lL][eE])://[^\x00]*",  # an allowed scheme
        )
    )
    + ")$"
)

JobId = Annotated[
    str,
    Field(max_length=defaults.MAX_JOB_ID_LEN, pattern=JOB_ID_PATTERN),
    _checked(validate_job_id),
]
Uri = Annotated[
    str, Field(max_length=defaults.MAX_URI_LEN, pattern=URI_PATTERN), _checked(validate_uri)
]
ModelName = Annotated[
    str,
    Field(
        max_length=165,
        pattern=MODEL_REF_PATTERN,
        description="model name, or name@version to pin one version",
    ),
    _checked(validate_model_ref),
]
# contract.job.PRIORITIES' values.
PriorityName = Literal["high", "normal", "low"]
TopK = Annotated[int, Field(ge=1, le=defaults.MAX_TOP_K)]
CallbackUrl = Annotated[
    str,
    Field(
        max_length=defaults.MAX_URI_LEN,
        pattern=CALLBACK_URL_PATTERN,
        description="http(s) URL that receives the job's final record as a signed webhook.",
    ),
    _checked(validate_callback_url),
]


BatchId = Annotated[
    str,
    Field(
        max_length=defaults.MAX_JOB_ID_LEN,
        pattern=JOB_ID_PATTERN,
        description="The batch the jobs join (created on first use); generated for many jobs "
        "when left out.",
    ),
    _checked(validate_batch_id),
]
Output = Annotated[
    str,
    Field(
        min_length=1,
        max_length=defaults.MAX_URI_LEN,
        pattern=OUTPUT_PATTERN,
        description="Where the results sink writes the batch's records as JSONL parts: "
        "s3://bucket/prefix/ or a directory under the sink's root.",
    ),
    _checked(validate_output),
]


class _Strict(BaseModel):
    # strict: JSON types as the Python API takes them; true, "5", 5.0 and 1e3 are no top_k.
    model_config = ConfigDict(extra="forbid", strict=True)


DeadlineS = Annotated[
    float,
    Field(
        gt=0,
        le=defaults.MAX_DEADLINE_S,
        description="Seconds from now (the gateway's receipt): a job not started by then ends "
        "expired, never fetched or run.",
    ),
]
TtlS = Annotated[
    int,
    Field(
        ge=1,
        le=defaults.MAX_TTL_S,
        description="Seconds the record is kept once the job is final (default "
        f"{defaults.JOB_TTL_S}).",
    ),
]


class _Timing(_Strict):
    deadline_s: DeadlineS | None = None
    ttl_s: TtlS | None = None


class JobIn(_Strict):
    uri: Uri
    id: JobId | None = Field(None, description="Your own job ID; generated when left out.")
    callback_url: CallbackUrl | None = None


class SubmitOne(JobIn, _Timing):
    """One job."""

    model: ModelName = defaults.MODEL
    top_k: TopK = defaults.TOP_K
    priority: PriorityName = Field("normal", description="high jobs are served first, low last")
    batch: BatchId | None = None
    output: Output | None = None


class SubmitMany(_Timing):
    """Many jobs for one model; the reply lists their records in the same order."""

    jobs: list[JobIn] = Field(min_length=1, max_length=MAX_JOBS_PER_REQUEST)
    model: ModelName = defaults.MODEL
    top_k: TopK = defaults.TOP_K
    callback_url: CallbackUrl | None = Field(
        None, description="The webhook of every job that names none of its own."
    )
    priority: PriorityName = Field("normal", description="high jobs are served first, low last")
    batch: BatchId | None = None
    output: Output | None = None
    keep_open: bool = Field(
        False,
        description="More requests add jobs to this batch: it does not finish, however many of "
        "its jobs are final, until POST /v1/batches/{id}/close.",
    )


def _body_kind(body: Any) -> str | None:
    """Which shape a body has: 'jobs' means many; anything else that is an object, one."""
    if isinstance(body, SubmitMany) or (isinstance(body, dict) and "jobs" in body):
        return "many"
    return "one" if isinstance(body, SubmitOne | dict) else None


Submission = Annotated[
    Annotated[SubmitOne, Tag("one")] | Annotated[SubmitMany, Tag("many")],
    Discriminator(
        _body_kind,
        custom_error_type="invalid_body",
        custom_error_message="send a JSON object (Content-Type: application/json) with 'uri' "
        "for one job or 'jobs' for many",
    ),
]


class ErrorBody(BaseModel):
    type: str
    message: str


def _record_model(record: type[Any], doc: str) -> type[BaseModel]:
    """A response model with ``record``'s fields, each required, as the record always has all.

    Nested dataclasses (``Prediction``, ``ErrorInfo``) become schema components of their own.
    """
    hints = typing.get_type_hints(record)
    fields: dict[str, Any] = {
        f.name: (hints[f.name], Field(description=f.metadata.get("doc")))
        for f in dataclasses.fields(record)
    }
    return create_model(f"{record.__name__}Out", __doc__=doc, **fields)


JobOut = _record_model(Job, "A job record, exactly as ``contract.job.Job.to_dict`` writes it.")


class JobList(BaseModel):
    batch: str | None = Field(description="the batch the jobs joined")
    jobs: list[JobOut]  # type: ignore[valid-type]


BatchOut = _record_model(Batch, "A batch's counters, progress and times, over every shard.")


class BatchCancelOut(BaseModel):
    cancelled: int = Field(description="jobs this request cancelled")
    batch: BatchOut  # type: ignore[valid-type]


class ModelOut(BaseModel):
    name: str
    version: str = Field(description="the default version, where unpinned jobs go")
    versions: list[str] = Field(description="every registered or declared version")
    weights: str
    random_weights: bool
    num_classes: int
    device: str
    workers: list[str] = Field(description="IDs of the workers with a live heartbeat.")
    queue_depth: int = Field(description="Messages waiting (each carries up to a chunk of jobs).")
    oldest_queued_age_s: float | None


class ModelList(BaseModel):
    models: list[ModelOut]


class ErrorOut(BaseModel):
    error: ErrorBody


# Each field's rule in words, for a refusal that would otherwise quote a pattern or a bound.
_ID_RULE = (
    f"must be 1 to {defaults.MAX_JOB_ID_LEN} characters of letters, digits, '.', '_', ':' and "
    "'-', starting with a letter or digit"
)
RULES = {
    "id": _ID_RULE,
    "job_id": _ID_RULE,
    "uri": f"must be a local path or an s3://, http://, https:// or file:// URI, of at most "
    f"{defaults.MAX_URI_LEN} characters",
    "model": "must be 1 to 100 characters of letters, digits, '.', '_' and '-', starting with a "
    "letter or digit",
    "top_k": f"must be an integer from 1 to {defaults.MAX_TOP_K}",
    "jobs": f"must list 1 to {MAX_JOBS_PER_REQUEST} jobs",
    "batch": _ID_RULE,
    "batch_id": _ID_RULE,
    "output": "must be s3://bucket/prefix/ or a directory, without control characters",
    "limit": f"must be an integer from 1 to {defaults.MAX_BATCH_PAGE}",
    "deadline_s": f"must be a number of seconds above 0 and at most {defaults.MAX_DEADLINE_S}",
    "ttl_s": f"must be an integer from 1 to {defaults.MAX_TTL_S} seconds",
}
# pydantic's error types that quote a field's constraint (a pattern, a length, a bound).
_CONSTRAINT_ERRORS = {
    "string_pattern_mismatch",
    "string_too_short",
    "string_too_long",
    "greater_than_equal",
    "greater_than",
    "less_than_equal",
    "too_short",
    "too_long",
}


def describe_problem(problem: Any) -> str:
    """One validation error as ``field: rule in words``, e.g. ``jobs.0.id: must be ...``."""
    loc = [str(p) for p in problem["loc"]]
    parts = loc[1:] if loc and loc[0] in ("body", "path", "query") else loc
    if loc[:1] == ["body"] and parts[:1] in (["one"], ["many"]):
        parts = parts[1:]  # the body's shape, not a field
    name = parts[-1] if parts else ""
    if problem["type"] in _CONSTRAINT_ERRORS and name in RULES:
        rule = RULES[name]
    else:
        rule = problem["msg"].removeprefix("Value error, ")
    return f"{'.'.join(parts) or 'body'}: {rule}"


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error codes, all with the ``{"error": {type, message}}`` body."""
    return {code: {"model": ErrorOut} for code in codes}
