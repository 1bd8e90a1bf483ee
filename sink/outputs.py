"""Where a batch's parts go: a directory under the sink's root, or an S3 prefix.

``target(output, policy)`` turns a batch's ``output`` into a ``Target`` or refuses it
(``OutputRefused``, which the sink records as the batch's ``output_error``): a directory must lie
under the sink's ``--root`` (a relative path is taken under it; ``..``, and symlinks leading out,
are refused), a bucket must be on the sink's ``--s3-bucket`` list when it has one. A part is
written whole or not at all: a temporary file renamed into place, or one S3 PUT.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from contract.errors import ServiceError

PART_PREFIX = "part-"
PART_SUFFIX = ".jsonl"


class OutputRefused(ServiceError):
    """This sink may not write to the output (outside its root, a bucket not allowed)."""

    type = "output_refused"


@dataclass(frozen=True)
class Policy:
    """Where the sink may write: local outputs under ``root`` (None: none at all), and S3
    buckets on ``buckets`` (empty: any its credentials can write)."""

    root: Path | None = None
    buckets: frozenset[str] = frozenset()


class Target(Protocol):
    def write(self, name: str, data: bytes) -> None: ...

    def parts(self) -> Iterator[bytes]: ...


def part_name(first_event: str) -> str:
    """A part's name: the stream ID of its first event (with ``-<n>`` for the n-th further part
    of the same events), unique in the stream, and the same when the same events are written
    again after a restart (the part is then replaced)."""
    return f"{PART_PREFIX}{first_event}{PART_SUFFIX}"


def target(output: str, policy: Policy, s3: Any = None) -> Target:
    if output[:5].lower() == "s3://":
        bucket, _, prefix = output[5:].partition("/")
        if not bucket:
            raise OutputRefused(f"output {output!r} names no bucket: s3://bucket/prefix/")
        if policy.buckets and bucket not in policy.buckets:
            raise OutputRefused(f"bucket {bucket!r} is not one this sink may write (--s3-bucket)")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        return S3Target(bucket, prefix, s3)
    return LocalTarget(_inside(output, policy.root))


def _inside(output: str, root: Path | None) -> Path:
    """The directory ``output`` names, resolved, once it is known to lie under ``root``."""
    if root is None:
        raise OutputRefused(f"output {output!r} is a directory, but this sink has no --root")
    base = root.resolve()
    path = (base / output.removeprefix("file://")).resolve()  # an absolute output stays itself
    if path != base and base not in path.parents:
        raise OutputRefused(f"output {output!r} is outside the sink's root")
    return path


@dataclass(frozen=True)
class LocalTarget:
    directory: Path

    def write(self, name: str, data: bytes) -> None:
        """Write ``name`` whole: a temporary file beside it, synced, then renamed over it. The
        directory is opened once created and checked again, so that a symlink swapped in for it
        meanwhile cannot lead outside."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory, os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            if os.path.realpath(f"/proc/self/fd/{fd}") != str(self.directory):
                raise OutputRefused(f"{self.directory} changed while it was opened")
            _remove_leftovers(fd, name)
            temp = f".{name}.{uuid.uuid4().hex}.tmp"
            out = os.open(
                temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=fd
            )
            with os.fdopen(out, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, name, src_dir_fd=fd, dst_dir_fd=fd)
            os.fsync(fd)
        finally:
            os.close(fd)

    def parts(self) -> Iterator[bytes]:
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob(f"{PART_PREFIX}*{PART_SUFFIX}")):
            yield path.read_bytes()


def _remove_leftovers(fd: int, name: str) -> None:
    """Remove the temporary files of earlier tries at part ``name`` (a sink killed while
    writing it; the same events are written again under the same name)."""
    for entry in os.listdir(fd):
        if entry.startswith(f".{name}.") and entry.endswith(".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry, dir_fd=fd)


@dataclass(frozen=True)
class S3Target:
    bucket: str
    prefix: str
    client: Any = field(default=None, compare=False)

    def write(self, name: str, data: bytes) -> None:
        self._client().put_object(
            Bucket=self.bucket,
            Key=f"{self.prefix}{name}",
            Body=data,
            ContentType="application/x-ndjson",
        )

    def parts(self) -> Iterator[bytes]:
        pages = self._client().get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}{PART_PREFIX}"):
            for item in page.get("Contents", []):
                if item["Key"].endswith(PART_SUFFIX):
                    body = self._client().get_object(Bucket=self.bucket, Key=item["Key"])["Body"]
                    yield body.read()

    def _client(self) -> Any:
        return self.client if self.client is not None else s3_client()


def s3_client() -> Any:
    """boto3's standard client (AWS_ENDPOINT_URL, profiles, instance roles ... apply)."""
    import boto3

    return boto3.session.Session().client("s3")


def read_records(where: Target) -> Iterator[dict[str, Any]]:
    """Every record in the parts at ``where``, each once: a record written twice (the sink
    restarted before it acknowledged its events) is the same record, and is skipped."""
    seen: set[str] = set()
    for part in where.parts():
        for line in part.splitlines():
            record = json.loads(line)
            if record["id"] not in seen:
                seen.add(record["id"])
                yield record
