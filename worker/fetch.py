"""Fetch an image's bytes from a local path, S3 or http(s), under one policy, for many threads.

Every failure leaves as a ``contract.errors.ServiceError``; only ``Unavailable`` (throttling,
5xx, timeouts) is retried, with exponential backoff and full jitter, and every fetch, retries
included, ends by one overall deadline (``DeadlineExceeded``).

Local files are opened beneath an already-open root directory (``openat2`` with
``RESOLVE_BENEATH`` where the kernel has it, else a walk from the root's descriptor that follows
no symlink), so swapping a directory for a symlink while a path is checked cannot lead outside.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import ipaddress
import os
import platform
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
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_any,
    wait_random_exponential,
)
from tenacity.stop import stop_base

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
from worker.deadline import Deadline, cut_at
from worker.netguard import SafeHttp, shorten
from worker.settings import (
    FETCH_BACKOFF_S,
    FETCH_DEADLINE_S,
    FETCH_MAX_REDIRECTS,
    FETCH_RETRIES,
    FETCH_TIMEOUT_S,
    MAX_BYTES,
)

# Longest single wait between two retries, whatever the attempt number.
MAX_BACKOFF_S = 10.0
# Connections the default S3 client keeps, enough for one per worker thread.
S3_POOL_CONNECTIONS = 64
# Bytes read from a local file or an S3 body at a time (the deadline is checked between reads).
READ_CHUNK_BYTES = 1024 * 1024
# openat2(2): the same number on x86_64 and aarch64; Python has no os.openat2.
SYS_OPENAT2 = 437
OPENAT2_MACHINES = frozenset({"x86_64", "aarch64"})
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08
# Tries of an openat2 that the kernel refused with EAGAIN (a rename raced a lookup).
OPENAT2_TRIES = 3

_S3_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
_S3_DENIED = frozenset({"AccessDenied", "AllAccessDisabled", "Forbidden", "403"})
_S3_TRANSIENT = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable"}
)
_BOTO_TRANSIENT = (BotoConnectionError, HTTPClientError, ResponseStreamingError)
_FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
# Path components that make a local path take the realpath route (worker.fetch._open_plain).
_UNPLAIN = frozenset({"", ".", ".."})
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class FetchPolicy:
    """What a worker may read and how hard it tries; built once from the worker's settings."""

    # Local paths must resolve (realpath: symlinks and .. included) under one of these.
    allowed_roots: tuple[Path, ...]
    # Byte cap for any source.
    max_bytes: int = MAX_BYTES
    # Buckets that may be read; None means any bucket.
    s3_buckets: frozenset[str] | None = None
    # Networks exempt from the private-address refusal (e.g. 127.0.0.0/8 for tests or on-prem).
    http_allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # Connect and read timeout of each request, in seconds.
    timeout_s: float = FETCH_TIMEOUT_S
    # Longest a whole fetch may take, retries and slow bodies included, in seconds.
    deadline_s: float = FETCH_DEADLINE_S
    # Redirects followed per http(s) fetch.
    max_redirects: int = FETCH_MAX_REDIRECTS
    # Retries of a transient failure, after the first attempt.
    retries: int = FETCH_RETRIES
    # Base of the exponential backoff, in seconds; each wait is uniform in [0, base * 2**n].
    backoff_s: float = FETCH_BACKOFF_S
    # CA bundle for https (e.g. a private CA); None means requests' default (certifi).
    ca_bundle: Path | None = None

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.timeout_s <= 0 or self.deadline_s <= 0:
            raise ValueError("FetchPolicy: max_bytes, timeout_s and deadline_s must be positive")
        if self.retries < 0 or self.max_redirects < 0 or self.backoff_s < 0:
            raise ValueError("FetchPolicy: retries, max_redirects and backoff_s must be >= 0")


def default_s3_client(policy: FetchPolicy) -> Any:
    """boto3's standard client (AWS_ENDPOINT_URL, profiles, ... apply).

    botocore's own retries are off: the fetch retry loop is the one place retries happen, so
    ``policy.retries`` means what it says instead of being multiplied by botocore's.
    """
    timeout = min(policy.timeout_s, policy.deadline_s)
    config = Config(
        max_pool_connections=S3_POOL_CONNECTIONS,
        retries={"mode": "standard", "total_max_attempts": 1},
        connect_timeout=timeout,
        read_timeout=timeout,
    )
    return boto3.session.Session().client("s3", config=config)


Reader = Callable[[str, Deadline], bytes]
# Opens a path relative to a root directory's descriptor, never leaving that directory.
Opener = Callable[[int, str], int]


class Fetcher:
    """Reads whole sources under a FetchPolicy; safe to share between threads."""

    def __init__(
        self, policy: FetchPolicy, s3_client: Any = None, opener: Opener | None = None
    ) -> None:
        self.policy = policy
        self._roots = tuple(Path(os.path.realpath(root)) for root in policy.allowed_roots)
        self._root_fds = tuple(open_root(root) for root in self._roots)
        self._root_prefixes = tuple(os.path.join(root, "") for root in self._roots)
        self._open = opener or (open_beneath if openat2_works(self._root_fds) else walk_beneath)
        self._s3 = s3_client
        self._s3_lock = threading.Lock()
        self._http = SafeHttp(
            allowed_networks=policy.http_allowed_networks,
            timeout_s=policy.timeout_s,
            max_redirects=policy.max_redirects,
            max_bytes=policy.max_bytes,
            ca_bundle=policy.ca_bundle,
        )

    def close(self) -> None:
        """Close the roots' directory descriptors."""
        for fd in self._root_fds:
            os.close(fd)

    def fetch(self, uri: str) -> bytes:
        """The source's bytes; transient network failures are retried, then reported as
        Unavailable, and the whole fetch ends by ``policy.deadline_s``. A local read is not
        retried: it has no throttling or timeouts to wait out, and the retry machinery would
        cost more than the read on the GPU path's hot loop."""
        read = self._reader(uri)
        deadline = Deadline(self.policy.deadline_s)
        if read == self._read_local:
            return read(uri, deadline)
        attempts = self.policy.retries + 1
        try:
            return self._retrying(attempts, deadline)(read, uri, deadline)
        except Unavailable as e:
            if deadline.expired():
                raise deadline.exceeded(shorten(uri)) from e
            raise Unavailable(f"{e} (gave up after {attempts} attempt(s))") from e

    def _retrying(self, attempts: int, deadline: Deadline) -> Retrying:
        backoff = wait_random_exponential(multiplier=self.policy.backoff_s, max=MAX_BACKOFF_S)
        return Retrying(
            retry=retry_if_exception_type(Unavailable),
            stop=stop_any(stop_after_attempt(attempts), _stop_when(deadline)),
            wait=lambda state: max(0.0, min(backoff(state), deadline.remaining())),
            reraise=True,
        )

    def _reader(self, uri: str) -> Reader:
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

    def _read_local(self, uri: str, deadline: Deadline) -> bytes:
        path = local_path(uri)
        fd = self._open_plain(path)
        if fd is None:
            root_fd, relative = self._beneath_root(uri, path)
            fd = self._open_file(uri, root_fd, relative)
        return read_regular(uri, fd, self.policy.max_bytes, deadline)

    def _open_plain(self, path: str) -> int | None:
        """The common case without realpath's lstat per component: a path written plainly
        under a root (no ``.``, ``..`` or empty component) is opened beneath the root's
        descriptor as it is, so it still cannot lead outside. None (a symlink the opener will
        not follow, a missing file, any failure) sends it the long way, which decides the
        outcome and its wording exactly as before."""
        for root, fd in zip(self._root_prefixes, self._root_fds, strict=True):
            if path.startswith(root):
                relative = path[len(root) :]
                if _UNPLAIN.isdisjoint(relative.split("/")):
                    try:
                        return self._open(fd, relative)
                    except OSError:
                        return None
        return None

    def _beneath_root(self, uri: str, path: str) -> tuple[int, str]:
        """The root (as its open descriptor) the path lies under, and the path relative to it.

        realpath resolves symlinks and .. for the check only; the file is then opened beneath
        the root's descriptor, so a path that changes in between cannot lead outside it. The
        refusal says the same whether or not anything exists outside the roots.
        """
        try:
            real = Path(os.path.realpath(path))
        except OSError as e:  # a symlink vanished or changed between lstat and readlink
            raise os_error(uri, e) from e
        for root, fd in zip(self._roots, self._root_fds, strict=True):
            if real.is_relative_to(root):
                return fd, str(real.relative_to(root))
        raise AccessDenied(f"{shorten(uri)} is outside the allowed roots")

    def _open_file(self, uri: str, root_fd: int, relative: str) -> int:
        if relative == ".":
            raise AccessDenied(f"{shorten(uri)} is not a regular file")
        try:
            return self._open(root_fd, relative)
        except OSError as e:
            raise os_error(uri, e) from e

    # S3

    def _s3_client(self) -> Any:
        """The S3 client, made on first use: making one looks up credentials, maybe over IMDS."""
        with self._s3_lock:
            if self._s3 is None:
                self._s3 = default_s3_client(self.policy)
            return self._s3

    def _read_s3(self, uri: str, deadline: Deadline) -> bytes:
        bucket, key = parse_s3(uri)
        allowed = self.policy.s3_buckets
        if allowed is not None and bucket not in allowed:
            raise AccessDenied(f"bucket {bucket!r} is not in the allow-list ({shorten(uri)})")
        try:
            obj = self._s3_client().get_object(Bucket=bucket, Key=key)
            return read_s3_body(uri, obj, self.policy.max_bytes, deadline)
        except ClientError as e:
            raise s3_error(uri, e) from e
        except BotoCoreError as e:
            if deadline.expired():
                raise deadline.exceeded(shorten(uri)) from e
            raise botocore_error(uri, e) from e


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


@functools.cache
def _libc_syscall() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc.syscall


def openat2(dir_fd: int, path: str, flags: int, resolve: int) -> int:
    """openat2(2) through libc's syscall(); raises OSError as os.open would."""
    how = _OpenHow(flags=flags, mode=0, resolve=resolve)
    encoded = os.fsencode(path)
    syscall = _libc_syscall()
    for _ in range(OPENAT2_TRIES):
        fd = syscall(SYS_OPENAT2, dir_fd, encoded, ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.EAGAIN:
            break
    raise OSError(err, os.strerror(err), path)


def openat2_works(root_fds: tuple[int, ...]) -> bool:
    """True where the kernel (and any seccomp filter) lets openat2 resolve beneath a root."""
    if platform.machine() not in OPENAT2_MACHINES or not root_fds:
        return False
    try:
        os.close(openat2(root_fds[0], ".", os.O_PATH | os.O_CLOEXEC, RESOLVE_BENEATH))
    except OSError:
        return False
    return True


def open_beneath(root_fd: int, relative: str) -> int:
    """Open a file that the kernel guarantees lies beneath root_fd (symlinks inside it work)."""
    return openat2(root_fd, relative, _FILE_FLAGS, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)


def walk_beneath(root_fd: int, relative: str) -> int:
    """Open a file beneath root_fd one component at a time, following no symlink at all.

    The relative path comes from realpath, so it has no symlinks and no ``..``: one met here was
    swapped in after the check, and the open fails (ENOTDIR or ELOOP) instead of following it.
    """
    *directories, name = relative.split("/")
    fd = os.dup(root_fd)
    try:
        for part in directories:
            next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        return os.open(name, _FILE_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
    finally:
        os.close(fd)


def open_root(root: Path) -> int:
    try:
        return os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ValueError(f"allowed root {root} cannot be opened as a directory: {e}") from e


def uri_scheme(uri: str) -> str:
    """The lower-cased scheme, ``file`` for a bare path."""
    if not uri:
        raise InvalidRequest("empty uri")
    match = _SCHEME.match(uri)
    return match.group(1).lower() if match else "file"


def is_local(uri: str) -> bool:
    """True for a bare path or a file:// URI: read from this host's disk, not the network (an
    empty URI is neither; its fetch says why)."""
    return bool(uri) and uri_scheme(uri) == "file"


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
    """Map a failed open/read of a file beneath a root (never one outside: those are refused
    before anything is opened)."""
    if isinstance(exc, FileNotFoundError):
        return NotFound(f"no such file: {shorten(uri)}")
    if exc.errno == errno.EINVAL:  # readlink of something no longer a symlink
        return AccessDenied(f"{shorten(uri)} changed while being opened")
    if isinstance(exc, PermissionError):
        return AccessDenied(f"permission denied reading {shorten(uri)}")
    if exc.errno == errno.ENAMETOOLONG:
        return InvalidRequest(f"path too long: {shorten(uri)}")
    if exc.errno == errno.EXDEV:  # openat2 met a path leading out of the root
        return AccessDenied(f"{shorten(uri)} is outside the allowed roots")
    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EAGAIN):  # changed after the check
        return AccessDenied(f"{shorten(uri)} changed while being opened")
    return Unavailable(f"cannot read {shorten(uri)}: {exc.strerror}")


def read_regular(uri: str, fd: int, max_bytes: int, deadline: Deadline) -> bytes:
    """The file's bytes: only a regular file, its size taken from fstat before anything is read
    (so a small file allocates a small buffer, and one over the cap is never read)."""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise AccessDenied(f"{shorten(uri)} is not a regular file")
        if info.st_size > max_bytes:
            raise TooLarge(f"{shorten(uri)} is {info.st_size} bytes; the cap is {max_bytes}")
        return read_sized(uri, fd, info.st_size, deadline)
    except OSError as e:
        raise os_error(uri, e) from e
    finally:
        os.close(fd)


def read_sized(uri: str, fd: int, size: int, deadline: Deadline) -> bytes:
    """Read a file of a known size in chunks, checking the deadline between them, up to one byte
    past ``size`` (so a file that grew is refused); a small file is one read and its EOF."""
    chunks: list[bytes] = []
    got = 0
    while got <= size:
        deadline.check(shorten(uri))
        chunk = os.read(fd, min(size + 1 - got, READ_CHUNK_BYTES))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    if got > size:
        raise Unavailable(f"{shorten(uri)} grew while being read")
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_s3(uri: str) -> tuple[str, str]:
    """Bucket and key of s3://bucket/key; the key is taken literally (no ?query or #fragment)."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or not key:
        raise InvalidRequest(f"expected s3://bucket/key, got {shorten(uri)}")
    return bucket, key


def read_s3_body(uri: str, obj: dict[str, Any], max_bytes: int, deadline: Deadline) -> bytes:
    """The object's bytes, refused by ContentLength before the body is read, and read in chunks
    that end by the deadline (a watchdog cuts the connection of a body that drips)."""
    with closing(obj["Body"]) as body, cut_at(deadline) as cutter:
        length = obj.get("ContentLength", 0)
        if length > max_bytes:
            raise TooLarge(f"{shorten(uri)} is {length} bytes; the cap is {max_bytes}")
        cutter.watch(_body_socket(body))
        chunks: list[bytes] = []
        size = 0
        while chunk := body.read(READ_CHUNK_BYTES):
            deadline.check(shorten(uri))
            size += len(chunk)
            if size > max_bytes:
                raise TooLarge(f"{shorten(uri)} is larger than the cap of {max_bytes} bytes")
            chunks.append(chunk)
    deadline.check(shorten(uri))
    return b"".join(chunks)


def _body_socket(body: Any) -> Any:
    """The socket under botocore's StreamingBody (a urllib3 response), if it can be reached."""
    connection = getattr(getattr(body, "_raw_stream", None), "connection", None)
    return getattr(connection, "sock", None)


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


def _stop_when(deadline: Deadline) -> stop_base:
    """A tenacity stop condition: the fetch's deadline has passed."""

    class _Expired(stop_base):
        def __call__(self, retry_state: RetryCallState) -> bool:
            return deadline.expired()

    return _Expired()
