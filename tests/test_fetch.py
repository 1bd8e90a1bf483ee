"""Fetcher against real sources: files in a temp dir, moto's S3 server, a local HTTP server.

Every socket goes to 127.0.0.1; a guard on ``socket.socket.connect`` refuses anything else.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
import threading
import time
import tracemalloc
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from contract.errors import (
    AccessDenied,
    DeadlineExceeded,
    InvalidRequest,
    NotFound,
    ServiceError,
    TooLarge,
    Unavailable,
)
from tests.support import swapping_dir_for_symlink
from worker import fetch as fetch_module
from worker.deadline import Deadline
from worker.fetch import Fetcher, FetchPolicy, Opener, open_beneath, walk_beneath

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
IMAGE = b"\xff\xd8\xff\xe0 pretend jpeg " * 10
SECRET = b"outside the root"
# Both ways a file is opened beneath a root: the kernel's openat2, and the O_NOFOLLOW walk.
OPENERS = pytest.mark.parametrize("opener", [open_beneath, walk_beneath], ids=["openat2", "walk"])
_real_connect = socket.socket.connect


@pytest.fixture(autouse=True)
def connects(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Every connect attempted; one outside 127.0.0.0/8 is refused, and fails the test."""
    seen: list[Any] = []

    def guarded(sock: socket.socket, address: Any) -> None:
        seen.append(address)
        if not _is_loopback(address):
            raise ConnectionRefusedError(f"test guard: no connect outside loopback: {address!r}")
        _real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    yield seen
    assert [address for address in seen if not _is_loopback(address)] == []


def _is_loopback(address: Any) -> bool:
    try:
        return ipaddress.ip_address(address[0]) in LOOPBACK
    except (TypeError, ValueError, IndexError):
        return False


def _policy(roots: tuple[Path, ...] = (), **overrides: Any) -> FetchPolicy:
    """A policy with small timeouts and backoff, so failure paths stay fast."""
    settings: dict[str, Any] = {
        "allowed_roots": roots,
        "http_allowed_networks": (LOOPBACK,),
        "timeout_s": 0.5,
        "retries": 2,
        "backoff_s": 0.01,
    }
    return FetchPolicy(**{**settings, **overrides})


# Local files


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "images"
    path.mkdir()
    (path / "cat.jpg").write_bytes(IMAGE)
    (tmp_path / "secret.txt").write_bytes(SECRET)
    return path


@pytest.fixture(params=[open_beneath, walk_beneath], ids=["openat2", "walk"])
def local(root: Path, request: pytest.FixtureRequest) -> Fetcher:
    return Fetcher(_policy((root,), max_bytes=len(IMAGE)), opener=request.param)


def test_reads_a_file_under_an_allowed_root(local: Fetcher, root: Path) -> None:
    assert local.fetch(str(root / "cat.jpg")) == IMAGE


def test_reads_a_file_uri_with_percent_escapes(local: Fetcher, root: Path) -> None:
    (root / "a cat#1.jpg").write_bytes(IMAGE)
    assert local.fetch(f"file://{root}/a%20cat%231.jpg") == IMAGE
    assert local.fetch(f"file://localhost{root}/cat.jpg") == IMAGE


def test_file_uri_naming_another_host_is_invalid(local: Fetcher, root: Path) -> None:
    with pytest.raises(InvalidRequest, match="remote host"):
        local.fetch(f"file://fileserver{root}/cat.jpg")


def test_dotdot_escape_from_the_root_is_refused(local: Fetcher, root: Path) -> None:
    with pytest.raises(AccessDenied, match="outside the allowed roots"):
        local.fetch(f"{root}/../secret.txt")


def test_symlink_pointing_outside_the_root_is_refused(local: Fetcher, root: Path) -> None:
    (root / "link.jpg").symlink_to(root.parent / "secret.txt")
    with pytest.raises(AccessDenied, match="outside the allowed roots"):
        local.fetch(str(root / "link.jpg"))


def test_symlinked_directory_pointing_outside_the_root_is_refused(
    local: Fetcher, root: Path
) -> None:
    (root / "shared").symlink_to(root.parent)
    with pytest.raises(AccessDenied, match="outside the allowed roots"):
        local.fetch(str(root / "shared" / "secret.txt"))


def test_symlink_within_the_root_is_followed(local: Fetcher, root: Path) -> None:
    (root / "alias.jpg").symlink_to(root / "cat.jpg")
    assert local.fetch(str(root / "alias.jpg")) == IMAGE


def test_only_a_path_not_written_plainly_costs_a_realpath(
    local: Fetcher, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (root / "alias.jpg").symlink_to("cat.jpg")
    resolved: list[str] = []
    realpath = os.path.realpath
    monkeypatch.setattr(os.path, "realpath", lambda p: resolved.append(p) or realpath(p))
    assert local.fetch(str(root / "cat.jpg")) == IMAGE
    assert resolved == []
    assert local.fetch(f"{root}/./cat.jpg") == IMAGE
    assert local.fetch(str(root / "alias.jpg")) == IMAGE
    assert len(resolved) >= 1


def test_missing_file_is_not_found(local: Fetcher, root: Path) -> None:
    with pytest.raises(NotFound, match=re.escape("dog.jpg")):
        local.fetch(str(root / "dog.jpg"))


def test_missing_file_outside_the_roots_is_refused_not_reported_missing(local: Fetcher) -> None:
    with pytest.raises(AccessDenied):
        local.fetch("/definitely/not/here.jpg")


def test_directory_is_refused(local: Fetcher, root: Path) -> None:
    (root / "album").mkdir()
    with pytest.raises(AccessDenied, match="not a regular file"):
        local.fetch(str(root / "album"))


def test_fifo_is_refused_without_blocking(local: Fetcher, root: Path) -> None:
    os.mkfifo(root / "pipe.jpg")
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(local.fetch, str(root / "pipe.jpg"))
        try:
            with pytest.raises(AccessDenied, match="not a regular file"):
                future.result(timeout=5)
        finally:
            _unblock_fifo(root / "pipe.jpg")


def _unblock_fifo(path: Path) -> None:
    """If a reader did block on the FIFO, open the write end so the test can still end."""
    with contextlib.suppress(OSError):  # no reader: nothing blocked
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def test_device_is_refused_instead_of_read_forever() -> None:
    fetcher = Fetcher(_policy((Path("/dev"),)))
    with pytest.raises(AccessDenied, match="not a regular file"):
        fetcher.fetch("/dev/zero")


def test_file_over_the_byte_cap_is_too_large(local: Fetcher, root: Path) -> None:
    (root / "big.jpg").write_bytes(IMAGE + b"!")
    with pytest.raises(TooLarge, match=re.escape("big.jpg")):
        local.fetch(str(root / "big.jpg"))


def test_unreadable_file_is_access_denied(
    local: Fetcher, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tests may run as root, which chmod cannot lock out; make open fail as it would for others.
    def denied(*args: Any, **kwargs: Any) -> int:
        raise PermissionError(13, "Permission denied")

    fetcher = Fetcher(local.policy, opener=denied)
    with pytest.raises(AccessDenied, match="permission denied"):
        fetcher.fetch(str(root / "cat.jpg"))


def test_a_small_file_is_read_without_allocating_the_byte_cap(root: Path) -> None:
    fetcher = Fetcher(_policy((root,), max_bytes=64 * 1024 * 1024))
    tracemalloc.start()
    try:
        assert fetcher.fetch(str(root / "cat.jpg")) == IMAGE
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


def test_a_local_read_past_the_deadline_fails_as_deadline_exceeded(root: Path) -> None:
    fetcher = Fetcher(_policy((root,), deadline_s=1e-9))
    with pytest.raises(DeadlineExceeded, match="deadline"):
        fetcher.fetch(str(root / "cat.jpg"))


@pytest.mark.parametrize(
    "target", ["secret.txt", "no-such-file.txt", "nowhere/deeper.txt"], ids=lambda t: t
)
def test_refusals_say_the_same_whether_or_not_something_exists_outside(
    local: Fetcher, root: Path, target: str
) -> None:
    (root / "link.jpg").symlink_to(root.parent / target)
    refusals = []
    for uri in (str(root / "link.jpg"), str(root.parent / target)):
        with pytest.raises(ServiceError) as caught:
            local.fetch(uri)
        refusals.append((caught.value.type, str(caught.value).replace(uri, "URI")))
    assert refusals == [("access_denied", "URI is outside the allowed roots")] * 2


@OPENERS
def test_swapping_a_directory_for_a_symlink_never_lets_a_fetch_read_outside(
    tmp_path: Path, opener: Opener
) -> None:
    """A process swaps root/dir for a symlink to a directory outside, as fast as it can, while
    threads fetch root/dir/*: each fetch reads the file inside or is refused, never outside."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "dir").mkdir(parents=True)
    outside.mkdir()
    for name in ("cat.jpg", "big.jpg"):
        (root / "dir" / name).write_bytes(IMAGE)
    (outside / "cat.jpg").write_bytes(SECRET)
    (outside / "big.jpg").write_bytes(SECRET * 1000)  # over the cap: TooLarge would tell its size
    fetcher = Fetcher(_policy((root,), max_bytes=len(IMAGE)), opener=opener)
    uris = [str(root / "dir" / name) for name in ("cat.jpg", "big.jpg")] * 3000
    with swapping_dir_for_symlink(root, outside), ThreadPoolExecutor(8) as pool:
        outcomes = Counter(pool.map(lambda uri: _outcome(fetcher, uri), uris))
    assert set(outcomes) <= {"inside", "access_denied", "not_found"}, outcomes
    assert outcomes["inside"] > 0 and outcomes["access_denied"] > 0, outcomes


def _outcome(fetcher: Fetcher, uri: str) -> str:
    try:
        data = fetcher.fetch(uri)
    except ServiceError as e:
        return e.type
    except Exception as e:
        return f"raised {e.__class__.__name__}"
    return "inside" if data == IMAGE else f"read {data[:20]!r}"


def test_long_uris_are_shortened_in_error_messages(local: Fetcher) -> None:
    with pytest.raises(AccessDenied) as caught:
        local.fetch("/elsewhere/" + "x" * 5000)
    assert "/elsewhere/xxx" in str(caught.value)
    assert len(str(caught.value)) < 300


@pytest.mark.parametrize("uri", ["ftp://example.com/cat.jpg", "gopher://x/y", ""])
def test_unsupported_uri_is_invalid(local: Fetcher, uri: str) -> None:
    with pytest.raises(InvalidRequest):
        local.fetch(uri)


def test_policy_with_nonsense_limits_is_rejected_at_startup() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        FetchPolicy(allowed_roots=(), max_bytes=0)


# S3 (moto's server over real HTTP, reached through boto3's standard configuration)


@pytest.fixture
def bucket(s3_client: Any) -> str:
    name = f"images-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    s3_client.put_object(Bucket=name, Key="cats/cat.jpg", Body=IMAGE)
    return name


@pytest.fixture
def s3_fetcher(aws_env: dict[str, str]) -> Fetcher:
    """The default S3 client: AWS_ENDPOINT_URL from the environment points it at moto."""
    return Fetcher(_policy(max_bytes=len(IMAGE)))


def test_s3_object_is_fetched(s3_fetcher: Fetcher, bucket: str) -> None:
    assert s3_fetcher.fetch(f"s3://{bucket}/cats/cat.jpg") == IMAGE


def test_s3_missing_key_is_not_found(s3_fetcher: Fetcher, bucket: str) -> None:
    with pytest.raises(NotFound, match="NoSuchKey"):
        s3_fetcher.fetch(f"s3://{bucket}/cats/dog.jpg")


def test_s3_missing_bucket_is_not_found(s3_fetcher: Fetcher) -> None:
    with pytest.raises(NotFound, match="NoSuchBucket"):
        s3_fetcher.fetch(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/cat.jpg")


def test_s3_bucket_outside_the_allow_list_is_refused_before_any_request(
    s3_client: Any, bucket: str
) -> None:
    sent: list[Any] = []
    s3_client.meta.events.register("before-send.s3", lambda **kwargs: sent.append(kwargs))
    fetcher = Fetcher(_policy(s3_buckets=frozenset({"other-bucket"})), s3_client=s3_client)
    with pytest.raises(AccessDenied, match=bucket):
        fetcher.fetch(f"s3://{bucket}/cats/cat.jpg")
    assert sent == []


def test_s3_bucket_in_the_allow_list_is_fetched(s3_client: Any, bucket: str) -> None:
    fetcher = Fetcher(_policy(s3_buckets=frozenset({bucket})), s3_client=s3_client)
    assert fetcher.fetch(f"s3://{bucket}/cats/cat.jpg") == IMAGE


def test_s3_object_over_the_byte_cap_is_too_large(
    s3_fetcher: Fetcher, s3_client: Any, bucket: str
) -> None:
    s3_client.put_object(Bucket=bucket, Key="big.jpg", Body=IMAGE + b"!")
    with pytest.raises(TooLarge, match=re.escape("big.jpg")):
        s3_fetcher.fetch(f"s3://{bucket}/big.jpg")


@pytest.mark.parametrize("uri", ["s3://bucket-only", "s3:///key", "s3://bucket/"])
def test_s3_uri_without_bucket_and_key_is_invalid(s3_fetcher: Fetcher, uri: str) -> None:
    with pytest.raises(InvalidRequest, match="s3://bucket/key"):
        s3_fetcher.fetch(uri)


def _s3_client_for(url: str, timeout_s: float = 2) -> Any:
    """A boto3 client aimed at the local HTTP server, with botocore's own retries off."""
    config = Config(
        retries={"mode": "standard", "total_max_attempts": 1},
        read_timeout=timeout_s,
        connect_timeout=timeout_s,
    )
    return boto3.client("s3", endpoint_url=url, config=config)


def test_s3_throttling_is_retried_then_unavailable(aws_env: Any, server: ImageServer) -> None:
    fetcher = Fetcher(_policy(retries=2), s3_client=_s3_client_for(server.url))
    with pytest.raises(Unavailable, match="SlowDown"):
        fetcher.fetch("s3://throttled/cat.jpg")
    assert server.hits["/throttled/cat.jpg"] == 3


def test_s3_read_timeout_is_unavailable(aws_env: Any, server: ImageServer) -> None:
    fetcher = Fetcher(_policy(retries=1), s3_client=_s3_client_for(server.url, timeout_s=0.3))
    with pytest.raises(Unavailable, match="timeout"):
        fetcher.fetch("s3://slow-headers/cat.jpg")
    assert server.hits["/slow-headers/cat.jpg"] == 2


# HTTP (a real ThreadingHTTPServer on 127.0.0.1)


class ImageServer(ThreadingHTTPServer):
    """Serves IMAGE and a few misbehaviours; counts the hits on each path."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients hanging up early (timeouts, size caps) is what several tests are about."""

    def hit(self, path: str) -> int:
        with self.lock:
            self.hits[path] += 1
            return self.hits[path]


class Handler(BaseHTTPRequestHandler):
    server: ImageServer

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        count = self.server.hit(self.path)
        route, _, arg = self.path.lstrip("/").partition("?")[0].partition("/")
        getattr(self, "route_" + route.replace("-", "_"), self.route_ok)(arg, count)

    def _send(self, status: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def route_ok(self, arg: str, count: int) -> None:
        self._send(200, IMAGE)

    def route_status(self, arg: str, count: int) -> None:
        self._send(int(arg))

    def route_redirect(self, arg: str, count: int) -> None:
        hops = int(arg)
        self._send(302, Location=f"/redirect/{hops - 1}" if hops > 1 else "/ok")

    def route_flaky(self, arg: str, count: int) -> None:
        self._send(503) if count == 1 else self._send(200, IMAGE)

    def route_throttled(self, arg: str, count: int) -> None:
        xml = b"<Error><Code>SlowDown</Code><Message>Please reduce your rate</Message></Error>"
        self._send(503, xml, Content_Type="application/xml")

    def route_big(self, arg: str, count: int) -> None:
        self._send(200, IMAGE * 100)

    def route_stream(self, arg: str, count: int) -> None:
        """A body without Content-Length that goes on far longer than any cap."""
        self.send_response(200)
        self.end_headers()
        for _ in range(256):
            self.wfile.write(IMAGE * 40)

    def route_slow_headers(self, arg: str, count: int) -> None:
        time.sleep(1.5)
        self._send(200, IMAGE)

    def route_drip(self, arg: str, count: int) -> None:
        """Headers at once, then the body a byte every 50 ms: no single read is slow."""
        self.send_response(200)
        self.send_header("Content-Length", str(len(IMAGE)))
        self.end_headers()
        self._drip(IMAGE)

    def route_drip_headers(self, arg: str, count: int) -> None:
        """The status line, then a header a byte every 50 ms."""
        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
        self._drip(b"X-Slow: " + b"z" * 500 + b"\r\n\r\n")

    def _drip(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # the client hung up: what the deadline tests want
            for n in range(len(data)):
                self.wfile.write(data[n : n + 1])
                self.wfile.flush()
                time.sleep(0.05)

    def route_slow_body(self, arg: str, count: int) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(IMAGE)))
        self.end_headers()
        self.wfile.write(IMAGE[:10])
        self.wfile.flush()
        time.sleep(1.5)


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    server = ImageServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def web() -> Fetcher:
    return Fetcher(_policy(max_bytes=len(IMAGE) * 2))


def test_http_body_is_fetched(web: Fetcher, server: ImageServer) -> None:
    assert web.fetch(f"{server.url}/ok") == IMAGE


@pytest.mark.parametrize(
    ("status", "error"),
    [(404, NotFound), (410, NotFound), (401, AccessDenied), (403, AccessDenied)],
)
def test_http_client_errors_are_reported_without_retrying(
    web: Fetcher, server: ImageServer, status: int, error: type[ServiceError]
) -> None:
    path = f"/status/{status}?{uuid.uuid4().hex}"
    with pytest.raises(error, match=f"HTTP {status}"):
        web.fetch(server.url + path)
    assert server.hits[path] == 1


def test_http_other_status_is_an_invalid_request(web: Fetcher, server: ImageServer) -> None:
    with pytest.raises(InvalidRequest, match="HTTP 400"):
        web.fetch(f"{server.url}/status/400")


@pytest.mark.parametrize("status", [429, 500, 503])
def test_http_transient_status_is_retried_then_unavailable(
    web: Fetcher, server: ImageServer, status: int
) -> None:
    path = f"/status/{status}?{uuid.uuid4().hex}"
    with pytest.raises(Unavailable, match=r"gave up after 3 attempt"):
        web.fetch(server.url + path)
    assert server.hits[path] == 3


def test_http_503_then_200_succeeds_on_retry(web: Fetcher, server: ImageServer) -> None:
    path = f"/flaky/{uuid.uuid4().hex}"
    assert web.fetch(server.url + path) == IMAGE
    assert server.hits[path] == 2


def test_http_redirect_chain_within_the_limit_is_followed(
    web: Fetcher, server: ImageServer
) -> None:
    assert web.fetch(f"{server.url}/redirect/3") == IMAGE


def test_http_redirect_chain_beyond_the_limit_is_refused(web: Fetcher, server: ImageServer) -> None:
    with pytest.raises(InvalidRequest, match="more than 3 redirects"):
        web.fetch(f"{server.url}/redirect/4")


def test_http_body_with_declared_length_over_the_cap_is_too_large(
    web: Fetcher, server: ImageServer
) -> None:
    with pytest.raises(TooLarge, match="cap"):
        web.fetch(f"{server.url}/big")


def test_http_streamed_body_is_cut_off_at_the_cap(web: Fetcher, server: ImageServer) -> None:
    started = time.monotonic()
    with pytest.raises(TooLarge, match="cap"):
        web.fetch(f"{server.url}/stream/{uuid.uuid4().hex}")
    assert time.monotonic() - started < 5


def test_http_slow_response_times_out_as_unavailable(web: Fetcher, server: ImageServer) -> None:
    path = f"/slow-headers/{uuid.uuid4().hex}"
    started = time.monotonic()
    with pytest.raises(Unavailable, match="Timeout"):
        web.fetch(server.url + path)
    assert time.monotonic() - started < 3
    assert server.hits[path] == 3


def test_http_body_that_stalls_times_out_as_unavailable(
    server: ImageServer,
) -> None:
    fetcher = Fetcher(_policy(retries=0))
    with pytest.raises(Unavailable, match="timed out"):
        fetcher.fetch(f"{server.url}/slow-body/{uuid.uuid4().hex}")


def test_http_loopback_is_refused_without_an_operator_allowance(
    server: ImageServer, connects: list[Any]
) -> None:
    fetcher = Fetcher(_policy(http_allowed_networks=()))
    with pytest.raises(AccessDenied, match=re.escape("127.0.0.1")):
        fetcher.fetch(f"{server.url}/ok")
    assert connects == []


def test_many_threads_fetch_from_every_source_at_once(
    server: ImageServer, root: Path, aws_env: Any, s3_client: Any, bucket: str
) -> None:
    fetcher = Fetcher(_policy((root,)))
    uris = [f"{server.url}/ok", str(root / "cat.jpg"), f"s3://{bucket}/cats/cat.jpg"] * 20
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(fetcher.fetch, uris))
    assert results == [IMAGE] * len(uris)


# One deadline per fetch, whatever the source


@pytest.mark.parametrize("route", ["drip", "drip-headers"])
def test_http_that_drips_a_byte_at_a_time_is_cut_at_the_deadline(
    server: ImageServer, route: str
) -> None:
    fetcher = Fetcher(_policy(timeout_s=5, deadline_s=1))
    with pytest.raises(DeadlineExceeded, match="1 s deadline"):
        fetcher.fetch(f"{server.url}/{route}/{uuid.uuid4().hex}")


def test_s3_body_that_drips_is_cut_at_the_deadline(aws_env: Any, server: ImageServer) -> None:
    fetcher = Fetcher(_policy(timeout_s=5, deadline_s=1), s3_client=_s3_client_for(server.url, 5))
    with pytest.raises(DeadlineExceeded, match="1 s deadline"):
        fetcher.fetch("s3://drip/cat.jpg")


def test_retries_end_at_the_deadline(web: Fetcher, server: ImageServer) -> None:
    path = f"/status/503?{uuid.uuid4().hex}"
    fetcher = Fetcher(_policy(retries=20, backoff_s=0.05, deadline_s=2.0))
    with pytest.raises(DeadlineExceeded):
        fetcher.fetch(server.url + path)
    assert 1 <= server.hits[path] < 21


def test_the_deadline_error_is_a_source_failure_not_poison() -> None:
    error = DeadlineExceeded("slow")
    assert (error.type, error.transient) == ("deadline_exceeded", True)
    assert not isinstance(error, Unavailable)


def test_a_local_file_is_read_whole_in_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetch_module, "READ_CHUNK_BYTES", 7)
    data = os.urandom(100)
    (tmp_path / "a.bin").write_bytes(data)
    assert Fetcher(FetchPolicy(allowed_roots=(tmp_path,))).fetch(str(tmp_path / "a.bin")) == data


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_a_file_that_grew_after_its_size_was_taken_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(fetch_module, "READ_CHUNK_BYTES", chunk)
    path = tmp_path / "growing.bin"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(Unavailable, match="grew while being read"):
            fetch_module.read_sized(str(path), fd, 90, Deadline(10))  # fstat had seen 90 bytes
    finally:
        os.close(fd)


def test_reading_a_large_file_stops_at_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetch_module, "READ_CHUNK_BYTES", 10)
    path = tmp_path / "slow.bin"
    path.write_bytes(b"x" * 100)
    ticks = iter(range(100))
    deadline = Deadline(3, clock=lambda: float(next(ticks)))  # 1 s passes at every check
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(DeadlineExceeded):
            fetch_module.read_sized(str(path), fd, 100, deadline)
    finally:
        os.close(fd)
