"""SSRF-safe HTTP(S) GET for image fetches: contract.netguard's pinned requests, with a deadline.

Every hop's host is resolved once and vetted (contract.netguard.pin), and the request goes to
that IP. Redirects are followed by hand so that every hop is vetted again, and a watchdog cuts
the socket when the fetch's deadline passes.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import requests
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from contract.errors import DeadlineExceeded, InvalidRequest, ServiceError, TooLarge
from contract.netguard import (
    IPNetwork,
    PinnedAdapter,
    check_requests,
    new_session,
    pin,
    shorten,
    status_error,
    transport_error,
)
from worker.deadline import Deadline, cut_at

__all__ = ["SafeHttp", "shorten"]

# Bytes read from a response body at a time.
CHUNK_BYTES = 64 * 1024

# The Cutter of the fetch this thread has in flight, so its connection can hand over its socket.
_in_flight = threading.local()


class _Watched:
    """Connection mixin: once a request is sent, its socket goes to this thread's Cutter."""

    sock: Any

    def request(self, *args: Any, **kwargs: Any) -> None:
        super().request(*args, **kwargs)  # type: ignore[misc]
        cutter = getattr(_in_flight, "cutter", None)
        if cutter is not None:
            cutter.watch(self.sock)


class WatchedHTTPConnection(_Watched, HTTPConnection):
    pass


class WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = WatchedHTTPConnection


class WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = WatchedHTTPSConnection


class WatchedAdapter(PinnedAdapter):
    """A PinnedAdapter whose connections hand their socket to the fetch's deadline watchdog."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": WatchedHTTPPool,
            "https": WatchedHTTPSPool,
        }


def read_capped(
    url: str, response: requests.Response, max_bytes: int, deadline: Deadline | None = None
) -> bytes:
    """Stream the body, stopping as soon as it passes max_bytes (whatever Content-Length said)
    or the deadline passes."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise TooLarge(f"{shorten(url)} is {declared} bytes; the cap is {max_bytes}")
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(CHUNK_BYTES):
        if deadline is not None:
            deadline.check(shorten(url))
        size += len(chunk)
        if size > max_bytes:
            raise TooLarge(f"{shorten(url)} is larger than the cap of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class SafeHttp:
    """GETs public http(s) URLs for many threads: one requests.Session per thread."""

    def __init__(
        self,
        allowed_networks: tuple[IPNetwork, ...] = (),
        *,
        max_bytes: int,
        timeout_s: float,
        max_redirects: int,
        ca_bundle: Path | None = None,
    ) -> None:
        self.allowed_networks = allowed_networks
        self.timeout_s = timeout_s
        self.max_redirects = max_redirects
        self.max_bytes = max_bytes
        self.verify: bool | str = str(ca_bundle) if ca_bundle is not None else True
        self._local = threading.local()
        check_requests()

    def session(self) -> requests.Session:
        """This thread's session (requests.Session is not safe to share between threads)."""
        if not hasattr(self._local, "session"):
            self._local.session = new_session(WatchedAdapter())
        return self._local.session

    def get(self, url: str, deadline: Deadline | None = None) -> bytes:
        """The body of url, following at most max_redirects redirects, each hop vetted.

        With a deadline, the whole exchange (every hop, headers and body) ends by it: a watchdog
        shuts the socket down when it passes, however slowly the server drips bytes.
        """
        if deadline is None:
            return self._follow(url, None)
        with cut_at(deadline) as cutter:
            _in_flight.cutter = cutter
            try:
                body = self._follow(url, deadline)
                if cutter.fired:  # a cut can look like a short answer that ended cleanly
                    raise deadline.exceeded(shorten(url))
                return body
            except ServiceError as e:
                if cutter.fired and not isinstance(e, DeadlineExceeded):
                    raise deadline.exceeded(shorten(url)) from e
                raise
            finally:
                _in_flight.cutter = None
                if cutter.fired:  # the cut connection must not go back to the pool
                    self.session().close()

    def _follow(self, url: str, deadline: Deadline | None) -> bytes:
        hop = url
        for _ in range(self.max_redirects + 1):
            try:
                with self._send(hop, deadline) as response:
                    location = self.session().get_redirect_target(response)
                    if location is None:
                        return self._body(hop, response, deadline)
            except requests.RequestException as e:
                raise transport_error(hop, e) from e
            hop = urljoin(hop, location)
        raise InvalidRequest(f"more than {self.max_redirects} redirects from {shorten(url)}")

    def _send(self, url: str, deadline: Deadline | None) -> requests.Response:
        target = pin(url, self.allowed_networks)
        if deadline is not None:
            deadline.check(shorten(url))
        timeout = deadline.timeout(self.timeout_s) if deadline else self.timeout_s
        return self.session().get(
            target.pinned_url,
            headers={"Host": target.host_header},
            stream=True,
            allow_redirects=False,
            timeout=timeout,
            verify=self.verify,
        )

    def _body(self, url: str, response: requests.Response, deadline: Deadline | None) -> bytes:
        error = status_error(url, response.status_code)
        if error is not None:
            raise error
        return read_capped(url, response, self.max_bytes, deadline)
