"""How a Redis failure reads at the edge: one line naming the cause, the URL's password masked,
and an exit status a script can act on. The producer's commands and the worker share these."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import redis
from kombu.exceptions import OperationalError

from contract.connection import connect

# Exit status when Redis cannot be reached (refused, timed out, DNS) or fails a command.
EXIT_REDIS_UNREACHABLE = 3
# Exit status when Redis refuses the credentials (wrong or missing password or user).
EXIT_REDIS_AUTH = 4
# Seconds the worker's start-up check waits for Redis to answer.
CHECK_TIMEOUT_S = 5.0

_AUTH_ERRORS = (redis.AuthenticationError, redis.exceptions.AuthorizationError)
# Errors that mean "Redis, not the request": what ``describe`` turns into one line.
REDIS_ERRORS = (redis.RedisError, OperationalError)


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (the user name is kept)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


def describe(error: BaseException, url: str) -> tuple[int, str]:
    """The exit status and the one line that say why ``error`` stopped a command on ``url``."""
    where = mask_url(url)
    cause = " ".join(str(error).split()) or type(error).__name__
    password = urlsplit(url).password
    if password:
        cause = cause.replace(password, "***")
    if isinstance(error, _AUTH_ERRORS) or _says_auth(cause):
        return EXIT_REDIS_AUTH, f"Redis at {where} refused authentication: {cause}"
    return EXIT_REDIS_UNREACHABLE, f"Redis at {where} is unreachable: {cause}"


def check(url: str, timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """PING ``url`` once (connect and authenticate); raises a Redis error if that fails."""
    client = connect(
        url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s, retry_on_timeout=False
    )
    try:
        client.ping()
    finally:
        client.close()


def _says_auth(cause: str) -> bool:
    return any(word in cause for word in ("WRONGPASS", "NOAUTH", "invalid password"))
