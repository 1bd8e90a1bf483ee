"""One way to reach Redis from a URL, for workers, producers, the gateway and the Celery broker.

Besides what ``redis.Redis.from_url`` takes (``redis://``, ``rediss://``, ``unix://``), a
Sentinel-managed primary is named as::

    redis+sentinel://[[user]:password@]host:port[,host:port...]/service_name[/db]

with the sentinels' addresses (port 26379 when left out; IPv6 in brackets), the name they
monitor the primary under (``sentinel monitor <service_name> …``) and the database number
(default 0). The password
is the Redis servers' (primary and replicas); add ``?sentinel_password=…`` when the sentinels
ask for one too. Every new connection asks the sentinels where the primary is, so after a
failover clients reconnect to the promoted replica.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import redis
from redis.sentinel import Sentinel

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
# Seconds to wait for one sentinel's answer before asking the next: a dead one must not stall.
SENTINEL_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class SentinelTarget:
    """What a ``redis+sentinel://`` URL names."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


def is_sentinel_url(url: str) -> bool:
    return url.lower().startswith(f"{SENTINEL_SCHEME}://")


def parse_sentinel_url(url: str) -> SentinelTarget:
    """The sentinels, service name and database of a ``redis+sentinel://`` URL."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    path = [p for p in parts.path.split("/") if p]
    if not hosts or not path or len(path) > 2 or not (path[1:] or ["0"])[0].isdigit():
        raise ValueError(
            f"a sentinel URL is {SENTINEL_SCHEME}://host:port[,host:port...]/service_name[/db],"
            f" not {_masked(url)!r}"
        )
    query = parse_qs(parts.query)
    return SentinelTarget(
        sentinels=tuple(_host_port(h) for h in hosts.split(",")),
        service=unquote(path[0]),
        db=int(path[1]) if len(path) > 1 else 0,
        username=unquote(username) or None,
        password=unquote(password) or None,
        sentinel_password=query.get("sentinel_password", [None])[0],
    )


def connect(url: str, **kwargs: Any) -> redis.Redis:
    """A client for ``url``; ``kwargs`` are connection options (``health_check_interval``...)."""
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, **kwargs)
    target = parse_sentinel_url(url)
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=_sentinel_kwargs(target))
    client: redis.Redis = sentinel.master_for(
        target.service,
        db=target.db,
        username=target.username,
        password=target.password,
        **kwargs,
    )
    return client


def celery_broker(url: str) -> tuple[str, dict[str, Any]]:
    """The broker URL and extra transport options for Celery (kombu's ``sentinel://`` form)."""
    if not is_sentinel_url(url):
        return url, {}
    target = parse_sentinel_url(url)
    auth = ""
    if target.username or target.password:
        auth = f"{quote(target.username or '', safe='')}:{quote(target.password or '', safe='')}@"
    broker = ";".join(
        f"sentinel://{auth}{_netloc_host(host)}:{port}/{target.db}"
        for host, port in target.sentinels
    )
    options = {"master_name": target.service, "sentinel_kwargs": _sentinel_kwargs(target)}
    return broker, options


def _sentinel_kwargs(target: SentinelTarget) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"socket_timeout": SENTINEL_TIMEOUT_S}
    if target.sentinel_password:
        kwargs["password"] = target.sentinel_password
    return kwargs


def _host_port(text: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``."""
    host, sep, port = text.rpartition(":")
    if not sep or "]" in port:
        return text.strip("[]"), SENTINEL_PORT
    return host.strip("[]"), int(port)


def _netloc_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _masked(url: str) -> str:
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at:
        return url
    return parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{hosts}").geturl()
