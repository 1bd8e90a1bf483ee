"""SSRF guard: every address a host resolves to is vetted, then only that one is connected to.

Resolving and connecting separately would let a DNS answer change in between (rebinding), so
each request goes to the vetted IP literal, while the Host header, TLS SNI and certificate check
keep the original hostname. Both the worker's image fetches (worker.netguard) and the webhook
sender (notifier) send their requests through this.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter

from contract.errors import AccessDenied, InvalidRequest, NotFound, ServiceError, Unavailable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Shared address space (carrier-grade NAT); Python does not count it as private.
CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
# NAT64 well-known prefix: its last 32 bits are an IPv4 address a gateway would reach.
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# Characters of a URI shown in an error message.
URI_SHOWN = 160
DEFAULT_PORTS = {"http": 80, "https": 443}
# Deprecated IPv6 site-local space (RFC 3879): private in practice, though Python calls it global.
SITE_LOCAL = ipaddress.IPv6Network("fec0::/10")


def shorten(uri: str) -> str:
    """A URI short enough for an error message (a data-URL-sized one would flood the logs)."""
    return uri if len(uri) <= URI_SHOWN else uri[:URI_SHOWN] + "..."


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, NAT64, Teredo), if any."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_special(ip: IPAddress) -> bool:
    """True for an address no fetch may reach by default: anything but the public internet."""
    inner = embedded_ipv4(ip)
    if inner is not None and is_special(inner):
        return True
    return (
        not ip.is_global
        or ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or ip in CGNAT
        or ip in SITE_LOCAL
    )


def is_exempt(ip: IPAddress, allowed: Iterable[IPNetwork]) -> bool:
    """True if an operator exempted this address (an IPv4-mapped one counts as its IPv4)."""
    plain = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip
    return any(plain.version == net.version and plain in net for net in allowed)


def check_address(ip: IPAddress, allowed: Iterable[IPNetwork], url: str) -> None:
    """Refuse a private, loopback, link-local, ... address unless the operator allowed it."""
    if is_special(ip) and not is_exempt(ip, allowed):
        raise AccessDenied(f"{shorten(url)} resolves to non-public address {ip}; refused")


def resolve(host: str, port: int, url: str) -> list[IPAddress]:
    """Every address the host resolves to: all are vetted, since a client may use any of them."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        if e.errno == socket.EAI_AGAIN:
            raise Unavailable(f"DNS lookup of {host!r} failed for {shorten(url)}: {e}") from e
        raise NotFound(f"cannot resolve {host!r} for {shorten(url)}: {e}") from e
    return [ipaddress.ip_address(info[4][0]) for info in infos]


@dataclass(frozen=True)
class Target:
    """One request, pinned: the URL to send (host = vetted IP) and the name it stands for."""

    pinned_url: str
    host_header: str


def parse_http_url(url: str) -> SplitResult:
    """Split an http(s) URL, refusing forms this service does not fetch."""
    try:
        parts = urlsplit(url)
    except ValueError as e:  # e.g. an unclosed IPv6 bracket: http://[::1/x
        raise InvalidRequest(f"malformed URL ({e}): {shorten(url)}") from e
    if parts.scheme.lower() not in DEFAULT_PORTS:
        raise InvalidRequest(f"only http and https may be fetched, not {shorten(url)}")
    if not parts.hostname:
        raise InvalidRequest(f"no host in {shorten(url)}")
    if parts.username is not None or parts.password is not None:
        raise InvalidRequest(f"credentials in the URL are not supported: {shorten(url)}")
    try:
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError as e:
        raise InvalidRequest(f"bad port in {shorten(url)}") from e
    return parts


def _netloc(host: str, port: int | None) -> str:
    bracketed = f"[{host}]" if ":" in host else host
    return bracketed if port is None else f"{bracketed}:{port}"


def ascii_host(host: str, url: str) -> str:
    """The host as DNS and the Host header see it (IDNA), so both name the same thing."""
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError as e:
        raise InvalidRequest(f"bad host name {host!r} in {shorten(url)}") from e


def pin(url: str, allowed: Iterable[IPNetwork]) -> Target:
    """Resolve the URL's host once, vet every answer, and aim the request at the first one."""
    parts = parse_http_url(url)
    scheme, host = parts.scheme.lower(), ascii_host(parts.hostname or "", url)
    port = parts.port or DEFAULT_PORTS[scheme]
    addresses = resolve(host, port, url)
    if not addresses:
        raise NotFound(f"{host!r} has no addresses ({shorten(url)})")
    for ip in addresses:
        check_address(ip, allowed, url)
    pinned = urlunsplit((scheme, _netloc(str(addresses[0]), port), parts.path, parts.query, ""))
    explicit = parts.port if parts.port not in (None, DEFAULT_PORTS[scheme]) else None
    return Target(pinned_url=pinned, host_header=_netloc(host, explicit))


class PinnedAdapter(HTTPAdapter):
    """Connects to the IP literal in the URL but does TLS (SNI and cert) as the Host header's name.

    Pools are keyed on (IP, port, name), so a connection is only reused for the same vetted pair.
    """

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: Any, cert: Any = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(
            request, verify, cert
        )
        pool_kwargs["server_hostname"] = urlsplit("//" + str(request.headers["Host"])).hostname
        return host_params, pool_kwargs


def check_requests() -> None:
    """Pinned https needs a hook of requests 2.32; refuse to start without it."""
    if not hasattr(HTTPAdapter, "build_connection_pool_key_attributes"):
        raise RuntimeError("pinned https needs requests>=2.32: pip install -U requests")


def new_session(adapter: PinnedAdapter | None = None) -> requests.Session:
    """A session that ignores the environment: a proxy or netrc would undo the pinning."""
    session = requests.Session()
    session.trust_env = False
    adapter = adapter or PinnedAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def status_error(url: str, status: int) -> ServiceError | None:
    """The service error a final (non-redirect) HTTP status means, or None for success."""
    if 200 <= status < 300:
        return None
    where = f"HTTP {status} from {shorten(url)}"
    if status in (404, 410):
        return NotFound(where)
    if status in (401, 403):
        return AccessDenied(where)
    if status == 429 or status >= 500:
        return Unavailable(where)
    return InvalidRequest(where)


def transport_error(url: str, exc: requests.RequestException) -> ServiceError:
    """Map a requests failure: TLS is permanent, timeouts and dropped connections are not."""
    name = f"{exc.__class__.__name__} fetching {shorten(url)}: {shorten(str(exc))}"
    if isinstance(exc, requests.exceptions.SSLError):
        return AccessDenied(f"TLS verification failed: {name}")
    transient = (
        requests.Timeout,
        requests.ConnectionError,
        requests.exceptions.ChunkedEncodingError,
    )
    if isinstance(exc, transient):
        return Unavailable(name)
    return InvalidRequest(name)
