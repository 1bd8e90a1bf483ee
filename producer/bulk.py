"""Bulk submission for people: URIs from an S3 prefix, waiting with progress, a summary.

The Python API streams; these helpers add what a terminal wants on top of it without holding
more than the job IDs in memory.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from contract.errors import AlreadyFinal, InvalidRequest, MalformedRecord, NotFound
from contract.job import CANCELLED, DONE, EXPIRED, FAILED, QUEUED, RUNNING, Job
from contract.store import CancelOutcome

# Exit statuses of `submit` and `result` (2 is click's usage error; 3 and 4 are Redis's, in
# contract.redis_errors). 1 also means a request was refused before anything was queued.
EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_UNFINISHED = 5
EXIT_ENDED_UNRUN = 6  # some job cancelled or expired; none failed, missing or unfinished
EXIT_INTERRUPTED = 130
# The status counted for an ID with no record (never submitted, or expired).
MISSING = "missing"


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` as (bucket, prefix); the prefix may be empty."""
    if not uri.startswith("s3://") or not uri[5:].split("/", 1)[0]:
        raise InvalidRequest(f"{uri!r} is not an S3 prefix: write s3://bucket/prefix")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix


def s3_uris(prefix_uri: str, s3_client: Any | None = None) -> Iterator[str]:
    """Every object under an S3 prefix as an ``s3://`` URI, listed page by page."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3_uri(prefix_uri)
    client = s3_client or boto3.client("s3")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    try:
        for page in pages:
            for obj in page.get("Contents", ()):
                if not obj["Key"].endswith("/"):
                    yield f"s3://{bucket}/{obj['Key']}"
    except (BotoCoreError, ClientError) as e:
        raise NotFound(f"cannot list {prefix_uri}: {e}") from e


def record(job_id: str, job: Job | None) -> dict[str, Any]:
    """The JSON line printed for a job: its record, or a ``not_found`` record naming the ID."""
    if job is not None:
        return job.to_dict()
    message = f"no job {job_id!r} (never submitted, or its record expired)"
    return {"id": job_id, "status": None, "error": {"type": NotFound.type, "message": message}}


def cancel_line(job_id: str, outcome: CancelOutcome, job: Job | None) -> dict[str, Any]:
    """The JSON line ``cancel`` prints for a job: what it found, the status now, and why it
    was left alone (``already_final``, ``not_found``), if it was."""
    status = None if job is None else str(job.status)
    error = None
    if outcome is CancelOutcome.ALREADY_FINAL:
        error = {"type": AlreadyFinal.type, "message": f"job {job_id} is already {status}"}
    elif outcome is CancelOutcome.CORRUPT:
        message = f"job record {job_id!r} is not a job; left as it is"
        error = {"type": MalformedRecord.type, "message": message}
    elif outcome is CancelOutcome.MISSING:
        message = f"no job {job_id!r} (never submitted, or its record expired)"
        error = {"type": NotFound.type, "message": message}
    return {"id": job_id, "outcome": str(outcome), "status": status, "error": error}


def in_input_order(
    job_ids: Iterable[str], finished: Iterable[tuple[str, Job | None]]
) -> Iterator[tuple[str, Job | None]]:
    """``finished`` reordered as ``job_ids``: each one as soon as every earlier one has come."""
    order = iter(dict.fromkeys(job_ids))
    held: dict[str, Job | None] = {}
    head = next(order, None)
    for job_id, job in finished:
        held[job_id] = job
        while head is not None and head in held:
            yield head, held.pop(head)
            head = next(order, None)


@dataclass
class Summary:
    """Counts of what a bulk run did; ``rate`` is finished (or, without waiting, queued) jobs/s."""

    started: float = field(default_factory=time.monotonic)
    submitted: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def add(self, jobs: Iterable[Job | None]) -> None:
        for job in jobs:
            self.statuses[job.status if job else MISSING] += 1
            if job is not None and job.error is not None:
                self.errors[job.error.type] += 1

    def stop(self) -> None:
        self.seconds = time.monotonic() - self.started

    def exit_status(self, waited: bool) -> int:
        """Unfinished jobs (after a wait) come first, then failed or missing ones."""
        if not waited:
            return EXIT_DONE
        if self.statuses[QUEUED] + self.statuses[RUNNING]:
            return EXIT_UNFINISHED
        if self.statuses[FAILED] + self.statuses[MISSING]:
            return EXIT_FAILED
        if self.statuses[CANCELLED] + self.statuses[EXPIRED]:
            return EXIT_ENDED_UNRUN
        return EXIT_DONE

    @property
    def finished(self) -> int:
        return sum(self.statuses[s] for s in (DONE, FAILED, CANCELLED, EXPIRED))

    @property
    def rate(self) -> float:
        counted = self.finished or self.submitted
        return counted / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "submitted": self.submitted,
            "done": self.statuses[DONE],
            "failed": self.statuses[FAILED],
            "failed_by_type": dict(self.errors),
            "cancelled": self.statuses[CANCELLED],
            "expired": self.statuses[EXPIRED],
            "pending": self.submitted - self.finished,
            "seconds": round(self.seconds, 3),
            "img_per_s": round(self.rate, 2),
        }

    def text(self) -> str:
        d = self.to_dict()
        by_type = ", ".join(f"{t} {n}" for t, n in sorted(self.errors.items()))
        failed = f"failed {d['failed']}" + (f" ({by_type})" if by_type else "")
        ended = "".join(f", {s} {d[s]}" for s in ("cancelled", "expired") if d[s])
        return (
            f"submitted {d['submitted']}, done {d['done']}, {failed}{ended}, "
            f"pending {d['pending']} in {self.seconds:.1f} s: {self.rate:.1f} img/s"
        )
