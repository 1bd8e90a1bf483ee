"""``python -m notifier``: the webhook sender (``run``), a secret for it (``new-secret``) and
the webhooks it gave up on (``dead``). Every option has an environment-variable fallback."""

from __future__ import annotations

import ipaddress
import json
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import click

from contract import defaults
from contract.connection import connect
from contract.logs import configure_logging
from contract.netguard import IPNetwork
from notifier.delivery import Poster
from notifier.schedule import read_dead
from notifier.service import Notifier, NotifierSettings
from notifier.signing import Signer, new_secret

redis_option = click.option(
    "--redis-url",
    envvar="REDIS_URL",
    default=defaults.REDIS_URL,
    show_default=True,
    help="Redis holding the job records and the events stream (env REDIS_URL).",
)

_F = TypeVar("_F", bound=Callable[..., Any])


def _numeric(
    name: str,
    kind: click.FloatRange | click.IntRange,
    default: float,
    help: str,
    envvar: str | None = None,
) -> Callable[[_F], _F]:
    """A number option within ``kind``'s range, its default shown in --help."""
    return click.option(
        name, type=kind, default=default, show_default=True, envvar=envvar, help=help
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Signed webhooks for finished jobs (Standard Webhooks), sent at least once."""


@main.command()
@redis_option
@click.option(
    "--secret",
    envvar="IMGCLS_WEBHOOK_SECRET",
    required=True,
    help="Signing secret, whsec_ + base64 (env IMGCLS_WEBHOOK_SECRET); see new-secret.",
)
@click.option(
    "--allow-network",
    "networks",
    multiple=True,
    envvar="IMGCLS_WEBHOOK_ALLOW_NETWORKS",
    help="A private network (CIDR) callbacks may reach anyway; repeatable "
    "(env IMGCLS_WEBHOOK_ALLOW_NETWORKS, space-separated). Like the worker's --http-allow-network.",
)
@_numeric(
    "--max-age-s",
    click.FloatRange(min=0),
    defaults.WEBHOOK_MAX_AGE_S,
    "Give a webhook up once it has failed for this long since its first try.",
    envvar="IMGCLS_WEBHOOK_MAX_AGE_S",
)
@_numeric(
    "--retry-base-s",
    click.FloatRange(min=0.01),
    defaults.WEBHOOK_RETRY_BASE_S,
    "Wait before the first retry; doubled each time, with jitter.",
)
@_numeric(
    "--retry-max-s",
    click.FloatRange(min=0.01),
    defaults.WEBHOOK_RETRY_MAX_S,
    "Longest wait between two retries.",
)
@_numeric(
    "--timeout-s",
    click.FloatRange(min=0.1),
    defaults.WEBHOOK_TIMEOUT_S,
    "Seconds a POST may take to connect, and to answer.",
)
@_numeric(
    "--concurrency",
    click.IntRange(min=1),
    defaults.WEBHOOK_CONCURRENCY,
    "POSTs in flight at once.",
)
@click.option(
    "--consumer",
    default=socket.gethostname(),
    show_default="the host name",
    help="This sender's name in the consumer group; keep it across restarts.",
)
@click.option(
    "--ca-bundle",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CA certificates for https callbacks (default: certifi's).",
)
@click.option("--log-level", default="info", show_default=True, envvar="LOG_LEVEL")
@click.option("--log-json/--no-log-json", default=False, envvar="LOG_JSON")
def run(
    redis_url: str,
    secret: str,
    networks: tuple[str, ...],
    max_age_s: float,
    retry_base_s: float,
    retry_max_s: float,
    timeout_s: float,
    concurrency: int,
    consumer: str,
    ca_bundle: Path | None,
    log_level: str,
    log_json: bool,
) -> None:
    """Send every finished job's webhook until SIGTERM or Ctrl-C."""
    configure_logging(log_level, log_json, quiet=("urllib3",))
    try:
        signer = Signer(secret)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--secret") from e
    settings = NotifierSettings(
        consumer=consumer,
        max_age_s=max_age_s,
        retry_base_s=retry_base_s,
        retry_max_s=retry_max_s,
        timeout_s=timeout_s,
        concurrency=concurrency,
    )
    poster = Poster(_networks(networks), timeout_s=timeout_s, ca_bundle=ca_bundle)
    client = connect(redis_url)
    stop = threading.Event()
    _stop_on_signals(stop)
    try:
        Notifier(client, signer, poster, settings).run(stop)
    finally:
        client.close()


def _networks(values: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    try:
        return tuple(ipaddress.ip_network(v) for value in values for v in value.split())
    except ValueError as e:
        raise click.BadParameter(
            f"{e} (write a CIDR such as 10.0.0.0/8)", param_hint="--allow-network"
        ) from e


def _stop_on_signals(stop: threading.Event) -> None:
    def handle(signum: int, _: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


@main.command("new-secret")
def new_secret_() -> None:
    """Print a fresh signing secret for IMGCLS_WEBHOOK_SECRET (give receivers the same one)."""
    click.echo(new_secret())


@main.command()
@redis_option
@click.option("--limit", type=click.IntRange(min=1), help="Show only the newest N.")
def dead(redis_url: str, limit: int | None) -> None:
    """Print the webhooks given up on, newest first, one JSON object per line."""
    client = connect(redis_url)
    try:
        for entry in read_dead(client, limit):
            click.echo(json.dumps(entry))
    finally:
        client.close()
