"""``python -m sink``: the results sink (``run``) and a reader of what it wrote (``read``).
Every option of ``run`` has an environment-variable fallback."""

from __future__ import annotations

import json
import signal
import socket
import threading
from pathlib import Path
from types import FrameType

import click

from contract import defaults
from contract.connection import connect
from contract.logs import configure_logging
from sink.outputs import OutputRefused, Policy, read_records, target
from sink.service import Sink, SinkSettings

redis_option = click.option(
    "--redis-url",
    envvar="REDIS_URL",
    default=defaults.REDIS_URL,
    show_default=True,
    help="Redis holding the job records and the events stream (env REDIS_URL); with "
    "--store-url shards, run one sink per shard.",
)
root_option = click.option(
    "--root",
    envvar="IMGCLS_SINK_ROOT",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory local outputs must lie under (a relative output is taken under it) "
    "(env IMGCLS_SINK_ROOT) [default: local outputs are refused].",
)
bucket_option = click.option(
    "--s3-bucket",
    "buckets",
    multiple=True,
    envvar="IMGCLS_SINK_S3_BUCKETS",
    help="A bucket outputs may name; repeatable (env IMGCLS_SINK_S3_BUCKETS, space-separated) "
    "[default: any bucket the sink's own AWS credentials can write].",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Write the finished records of batches that name an output as JSONL parts."""


@main.command()
@redis_option
@root_option
@bucket_option
@click.option(
    "--record-ttl-s",
    envvar="IMGCLS_SINK_RECORD_TTL_S",
    type=click.IntRange(min=1),
    help="Once a record is written to its output, let its Redis copy expire within this many "
    "seconds (never later than it would have) (env IMGCLS_SINK_RECORD_TTL_S) [default: keep].",
)
@click.option(
    "--part-records",
    type=click.IntRange(min=1, max=100_000),
    default=2000,
    show_default=True,
    help="The most records one part holds (each read asks for about a part of events).",
)
@click.option(
    "--consumer",
    default=socket.gethostname(),
    show_default="the host name",
    help="This sink's name in the consumer group; keep it across restarts.",
)
@click.option("--log-level", default="info", show_default=True, envvar="LOG_LEVEL")
@click.option("--log-json/--no-log-json", default=False, envvar="LOG_JSON")
def run(
    redis_url: str,
    root: Path | None,
    buckets: tuple[str, ...],
    record_ttl_s: int | None,
    part_records: int,
    consumer: str,
    log_level: str,
    log_json: bool,
) -> None:
    """Write every finished record of a batch with an output until SIGTERM or Ctrl-C."""
    configure_logging(log_level, log_json, quiet=("botocore", "urllib3"))
    settings = SinkSettings(
        policy=_policy(root, buckets),
        consumer=consumer,
        part_records=part_records,
        record_ttl_s=record_ttl_s,
    )
    client = connect(redis_url)
    stop = threading.Event()
    _stop_on_signals(stop)
    try:
        Sink(client, settings).run(stop)
    finally:
        client.close()


@main.command()
@root_option
@bucket_option
@click.argument("output")
def read(root: Path | None, buckets: tuple[str, ...], output: str) -> None:
    """Print every record written to OUTPUT, each once, one JSON line each."""
    try:
        for record in read_records(target(output, _policy(root, buckets))):
            click.echo(json.dumps(record))
    except OutputRefused as e:
        raise click.ClickException(f"{e.type}: {e}") from e


def _policy(root: Path | None, buckets: tuple[str, ...]) -> Policy:
    names = frozenset(b for value in buckets for b in value.split())
    return Policy(root=root, buckets=names)


def _stop_on_signals(stop: threading.Event) -> None:
    def handle(signum: int, _: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
