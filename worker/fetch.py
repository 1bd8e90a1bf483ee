"""Fetch an image's bytes from a local path, S3 or http(s), under one policy, for many threads.

Every failure leaves as a ``contract.errors.ServiceError``; only ``Unavailable`` (throttling,
5xx, timeouts) is retried, with exponential backoff and full jitter.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import stat
import threading
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    ParamValidationError,
    ResponseStreamingError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from contract.errors import (
    AccessDenied,
    InternalError,
    InvalidRequest,
    NotFound,
    ServiceError,
    TooLarge,
    Unavailable,
)
from contract.job import URI_SCHEME as _SCHEME
from worker.netguard import SafeHttp, shorten

# Longest single wait between two retries, whatever the attempt number.
MAX_BACKOFF_S = 10.0
# Connections the default S3 client keeps, enough for one per worker thread.
S3_POOL_CONNECTIONS = 64

_S3_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
_S3_DENIED = frozenset({"AccessDenied", "AllAccessDisabled", "Forbidden", "403"})
_S3_TRANSIENT = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable"}
)
_BOTO_TRANSIENT = (BotoConnectionError, HTTPClientError, ResponseStreamingError)


@dataclass(frozen=True)
class FetchPolicy:
    """What a worker may read and how hard it tries; built once from the worker's settings."""

    # Local paths must resolve (realpath: symlinks and .. included) under one of these.
    allowed_roots: tuple[Path, ...]
    # Byte cap for any source.
    max_bytes: int = 50 * 1024 * 1024
    # Buckets that may be read; None means any bucket.
    s3_buckets: frozenset[str] | None = None
    # Networks exempt from the private-address refusal (e.g. 127.0.0.0/8 for tests or on-prem).
    http_allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # Connect and read timeout of each request, in seconds.
    timeout_s: float = 10.0
    # Redirects followed per http(s) fetch.
    max_redirects: int = 3
    # Retries of a transient failure, after the first attempt.
    retries: int = 3
    # Base of the exponential backoff, in seconds; each wait is uniform in [0, base * 2**n].
    backoff_s: float = 0.2
    # CA bundle for https (e.g. a private CA); None means requests' default (certifi).
    ca_bundle: Path | None = None

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.timeout_s <= 0:
            raise ValueError("FetchPolicy: max_bytes and timeout_s must be positive")
        if self.retries < 0 or self.max_redirects < 0 or self.backoff_s < 0:
            raise ValueError("FetchPolicy: retries, max_redirects and backoff_s must be >= 0")


def default_s3_client(policy: FetchPolicy) -> Any:
    """boto3's standard client (AWS_ENDPOINT_URL, profiles, ... apply).

    botocore's own retries are off: the fetch retry loop is the one place retries happen, so
    ``policy.retries`` means what it says instead of being multiplied by botocore's.
    """
    config = Config(
        max_pool_connections=S3_POOL_CONNECTIONS,
        retries={"mode": "standard", "total_max_attempts": 1},
        connect_timeout=policy.timeout_s,
        read_timeout=policy.timeout_s,
    )
    return boto3.session.Session().client("s3", config=config)


class Fetcher:
    """Reads whole sources under a FetchPolicy; safe to share between threads."""

    def __init__(self, policy: FetchPolicy, s3_client: Any = None) -> None:
        self.policy = policy
        self._roots = tuple(Path(os.path.realpath(root)) for root in policy.allowed_roots)
        self._s3 = s3_client
        self._s3_lock = threading.Lock()
        self._http = SafeHttp(
            allowed_networks=policy.http_allowed_networks,
            timeout_s=policy.timeout_s,
            max_redirects=policy.max_redirects,
            max_bytes=policy.max_bytes,
            ca_bundle=policy.ca_bundle,
        )

    def fetch(self, uri: str) -> bytes:
        """The source's bytes; transient network failures are retried, then reported as
        Unavailable. A local read is not retried: it has no throttling or timeouts to wait out,
        and the retry machinery would cost more than the read on the GPU path's hot loop."""
        read = self._reader(uri)
        if read == self._read_local:
            return read(uri)
        attempts = self.policy.retries + 1
        try:
            return self._retrying(attempts)(read, uri)
        except Unavailable as e:
            raise Unavailable(f"{e} (gave up after {attempts} attempt(s))") from e

    def _retrying(self, attempts: int) -> Retrying:
        return Retrying(
            retry=retry_if_exception_type(Unavailable),
            stop=stop_after_attempt(attempts),
            wait=wait_random_exponential(multiplier=self.policy.backoff_s, max=MAX_BACKOFF_S),
            reraise=True,
        )

    def _reader(self, uri: str) -> Callable[[str], bytes]:
        """The reader for the URI's scheme; a bare path is a local file."""
        scheme = uri_scheme(uri)
        if scheme in ("http", "https"):
            return self._http.get
        if scheme == "s3":
            return self._read_s3
        if scheme == "file":
            return self._read_local
        raise InvalidRequest(f"unsupported scheme {scheme!r} in {shorten(uri)}")

    # Local files

    def _read_local(self, uri: str) -> bytes:
        real = self._inside_roots(uri, local_path(uri))
        fd = open_regular(uri, real)
        return read_regular(uri, fd, self.policy.max_bytes)

    def _inside_roots(self, uri: str, path: str) -> Path:
        """The real path (symlinks and .. resolved), refused unless under an allowed root."""
        real = Path(os.path.realpath(path))
        if not any(real.is_relative_to(root) for root in self._roots):
            raise AccessDenied(f"{shorten(uri)} is outside the allowed roots")
        return real

    # S3

    def _s3_client(self) -> Any:
        """The S3 client, made on first use: making one looks up credentials, maybe over IMDS."""
        with self._s3_lock:
            if self._s3 is None:
                self._s3 = default_s3_client(self.policy)
            return self._s3

    def _read_s3(self, uri: str) -> bytes:
        bucket, key = parse_s3(uri)
        allowed = self.policy.s3_buckets
        if allowed is not None and bucket not in allowed:
            raise AccessDenied(f"bucket {bucket!r} is not in the allow-list ({shorten(uri)})")
        try:
            obj = self._s3_client().get_object(Bucket=bucket, Key=key)
            return read_s3_body(uri, obj, self.policy.max_bytes)
        except ClientError as e:
            raise s3_error(uri, e) from e
        except BotoCoreError as e:
            raise botocore_error(uri, e) from e


def uri_scheme(uri: str) -> str:
    """The lower-cased scheme, ``file`` for a bare path."""
    if not uri:
        raise InvalidRequest("empty uri")
    match = _SCHEME.match(uri)
    return match.group(1).lower() if match else "file"


def local_path(uri: str) -> str:
    """The filesystem path of a bare path or a file:// URI (host empty or localhost)."""
    path = uri
    if _SCHEME.match(uri):
        host, _, rest = uri[len("file://") :].partition("/")
        if host.lower() not in ("", "localhost"):
            raise InvalidRequest(f"file URI names a remote host: {shorten(uri)}")
        path = unquote("/" + rest)
    if "\0" in path:
        raise InvalidRequest(f"NUL byte in path {shorten(uri)}")
    return path


def os_error(uri: str, exc: OSError) -> ServiceError:
    """Map a failed stat/open/read of a local file."""
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return NotFound(f"no such file: {shorten(uri)}")
    if isinstance(exc, PermissionError):
        return AccessDenied(f"permission denied reading {shorten(uri)}")
    if exc.errno == errno.ENAMETOOLONG:
        return InvalidRequest(f"path too long: {shorten(uri)}")
    if exc.errno == errno.ELOOP:  # a symlink appeared after the path was checked
        return AccessDenied(f"{shorten(uri)} became a symlink while being opened")
    return Unavailable(f"cannot read {shorten(uri)}: {exc}")


def open_regular(uri: str, real: Path) -> int:
    """Open only a regular file: stat first, since opening a FIFO would block the thread."""
    try:
        if not stat.S_ISREG(os.stat(real).st_mode):
            raise AccessDenied(f"{shorten(uri)} is not a regular file")
        # NOFOLLOW/NONBLOCK: a symlink or FIFO swapped in after the stat fails instead of hanging.
        return os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise os_error(uri, e) from e


def read_regular(uri: str, fd: int, max_bytes: int) -> bytes:
    """Read at most max_bytes + 1 bytes, refusing by fstat before reading anything."""
    try:
        with os.fdopen(fd, "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise AccessDenied(f"{shorten(uri)} is not a regular file")
            if info.st_size > max_bytes:
                raise TooLarge(f"{shorten(uri)} is {info.st_size} bytes; the cap is {max_bytes}")
            data = file.read(max_bytes + 1)
    except OSError as e:
        raise os_error(uri, e) from e
    if len(data) > max_bytes:
        raise TooLarge(f"{shorten(uri)} grew past the cap of {max_bytes} bytes while read")
    return data


def parse_s3(uri: str) -> tuple[str, str]:
    """Bucket and key of s3://bucket/key; the key is taken literally (no ?query or #fragment)."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or not key:
        raise InvalidRequest(f"expected s3://bucket/key, got {shorten(uri)}")
    return bucket, key


def read_s3_body(uri: str, obj: dict[str, Any], max_bytes: int) -> bytes:
    """The object's bytes, refused by ContentLength before the body is read."""
    with closing(obj["Body"]) as body:
        length = obj.get("ContentLength", 0)
        if length > max_bytes:
            raise TooLarge(f"{shorten(uri)} is {length} bytes; the cap is {max_bytes}")
        data = body.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise TooLarge(f"{shorten(uri)} is larger than the cap of {max_bytes} bytes")
    return data


def s3_error(uri: str, exc: ClientError) -> ServiceError:
    """Map an S3 error response by its code, falling back to the HTTP status."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    where = f"S3 {code or status} for {shorten(uri)}"
    if code in _S3_NOT_FOUND or status == 404:
        return NotFound(where)
    if code in _S3_DENIED or status == 403:
        return AccessDenied(where)
    if code in _S3_TRANSIENT or status == 429 or status >= 500:
        return Unavailable(where)
    return InvalidRequest(where)


def botocore_error(uri: str, exc: BotoCoreError) -> ServiceError:
    """Map a client-side botocore failure: network trouble is transient, the rest is not."""
    where = f"{exc.__class__.__name__} for {shorten(uri)}: {exc}"
    if isinstance(exc, _BOTO_TRANSIENT):
        return Unavailable(where)
    if isinstance(exc, NoCredentialsError):
        return AccessDenied(where)
    if isinstance(exc, ParamValidationError):
        return InvalidRequest(where)
    return InternalError(where)
