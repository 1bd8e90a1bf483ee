"""Export job records to JSONL (the records as stored) or CSV (one flat row per job).

IDs come from arguments, from a file of IDs or of ``submit``'s output lines, or from a scan of
every record in Redis; records are read and written in chunks so any number fits.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Iterable, Iterator
from typing import IO, Any

import redis

from contract import keys
from contract.job import Job

# Job records read from Redis per round trip.
READ_CHUNK = 2000
FORMATS = ("jsonl", "csv")
CSV_COLUMNS = (
    "id",
    "uri",
    "model",
    "status",
    "top_k",
    "label",
    "probability",
    "predictions",
    "error_type",
    "error_message",
    "submitted",
    "started",
    "finished",
    "attempts",
    "worker",
    "weights",
    "random_weights",
)


def ids_from_lines(lines: Iterable[str]) -> Iterator[str]:
    """Bare job IDs, or JSON job records (``submit``'s output) from which the ID is taken."""
    for line in lines:
        text = line.strip()
        if not text or text == "null":
            continue
        if text.startswith("{"):
            yield str(json.loads(text)["id"])
        else:
            yield text


def all_job_ids(*clients: redis.Redis) -> Iterator[str]:
    """Every job ID with a record on the given Redis instances, by SCAN (no blocking KEYS)."""
    prefix = keys.job_key("")
    for client in clients:
        for key in client.scan_iter(match=keys.job_key("*"), count=1000):
            yield keys.text(key)[len(prefix) :]


def chunks(ids: Iterable[str], size: int = READ_CHUNK) -> Iterator[list[str]]:
    it = iter(ids)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def csv_row(job: Job) -> dict[str, Any]:
    record = job.to_dict()
    top = job.predictions[0] if job.predictions else None
    return {
        **{c: record[c] for c in CSV_COLUMNS if c in record and c not in ("predictions",)},
        "label": None if top is None else top.label,
        "probability": None if top is None else top.probability,
        "predictions": None if job.predictions is None else json.dumps(record["predictions"]),
        "error_type": None if job.error is None else job.error.type,
        "error_message": None if job.error is None else job.error.message,
    }


class Writer:
    """Writes records in one format to a text stream; counts what it wrote."""

    def __init__(self, out: IO[str], fmt: str) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        self.out = out
        self.fmt = fmt
        self.written = 0
        self._csv = csv.DictWriter(out, CSV_COLUMNS) if fmt == "csv" else None
        if self._csv is not None:
            self._csv.writeheader()

    def write(self, job: Job) -> None:
        if self._csv is not None:
            self._csv.writerow(csv_row(job))
        else:
            self.out.write(json.dumps(job.to_dict()) + "\n")
        self.written += 1
