"""``python -m producer``: submit image URIs and read results, one JSON record per line."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator

import click

from contract import defaults
from contract.errors import ServiceError
from contract.job import Job
from producer.client import Client, SubmitRequest

redis_option = click.option(
    "--redis-url",
    envvar="REDIS_URL",
    default=defaults.REDIS_URL,
    show_default=True,
    help="Redis holding the queues and job records (env REDIS_URL).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Submit images for classification and read their results."""


@main.command()
@redis_option
@click.option(
    "--model",
    default=defaults.MODEL,
    show_default=True,
    help="Model to classify with; a worker must serve it.",
)
@click.option("--top-k", default=defaults.TOP_K, show_default=True, help="Labels per image.")
@click.option(
    "--wait",
    type=float,
    default=None,
    help="Wait up to this many seconds and print each job's final state.",
)
@click.option(
    "--file",
    "from_file",
    type=click.File("r"),
    help="Read URIs from this file, one per line ('-' for standard input).",
)
@click.option(
    "--chunk-size", default=defaults.CHUNK_SIZE, show_default=True, help="Jobs per queue message."
)
@click.argument("uris", nargs=-1)
def submit(
    redis_url: str,
    model: str,
    top_k: int,
    wait: float | None,
    from_file,
    chunk_size: int,
    uris: tuple[str, ...],
) -> None:
    """Queue one job per URI (a path, s3://bucket/key or http(s)://); print their records."""
    requests = _uris(uris, from_file)
    client = Client.from_url(redis_url, chunk_size=chunk_size)
    try:
        jobs = client.iter_submit(requests, model=model, top_k=top_k)
        if wait is None:
            _print(jobs)
        else:
            ids = [j.id for j in jobs]
            _print(client.wait_many(ids, wait))
    except ServiceError as e:
        raise click.ClickException(f"{e.type}: {e}") from e
    finally:
        client.close()


@main.command()
@redis_option
@click.option("--wait", type=float, default=0.0, help="Wait up to this many seconds for each.")
@click.argument("job_ids", nargs=-1, required=True)
def result(redis_url: str, wait: float, job_ids: tuple[str, ...]) -> None:
    """Print the records of JOB_IDS (null for an unknown or expired ID)."""
    client = Client.from_url(redis_url)
    try:
        _print(client.wait_many(list(job_ids), wait))
    finally:
        client.close()


def _uris(args: tuple[str, ...], from_file) -> Iterator[SubmitRequest]:
    if args == ("-",):
        args, from_file = (), sys.stdin
    lines: Iterable[str] = from_file if from_file is not None else ()
    for uri in (*args, *lines):
        if uri.strip():
            yield SubmitRequest(uri.strip())


def _print(jobs: Iterable[Job | None]) -> None:
    for job in jobs:
        click.echo(json.dumps(None if job is None else job.to_dict()))
