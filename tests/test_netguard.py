"""SSRF guard: private addresses are refused before any connect, and requests stay pinned.

Every socket these tests open goes to 127.0.0.1: host names are answered by a fake resolver,
and a guard on ``socket.socket.connect`` refuses (and records) anything outside 127.0.0.0/8.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from contract.errors import AccessDenied, InvalidRequest, NotFound
from contract.netguard import check_address, is_special
from worker.netguard import SafeHttp

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
ALLOW_LOOPBACK = (LOOPBACK,)
BODY = b"\x89PNG pretend image"
_real_connect = socket.socket.connect
_real_getaddrinfo = socket.getaddrinfo

NON_PUBLIC = [
    "10.0.0.5",
    "192.168.1.1",
    "172.16.0.1",
    "169.254.169.254",
    "100.64.0.1",
    "::1",
    "fe80::1",
    "::ffff:127.0.0.1",
    "0.0.0.0",
    "127.0.0.1",
    "224.0.0.1",
    "240.0.0.1",
    "fc00::1",
    "::",
    "::ffff:169.254.169.254",
    "64:ff9b::a9fe:a9fe",
    "2002:a9fe:a9fe::1",
    "fec0::1",
]


def _http(**overrides: Any) -> SafeHttp:
    """A SafeHttp with the limits a worker passes down, small enough for tests."""
    limits: dict[str, Any] = {"max_bytes": 1024 * 1024, "timeout_s": 2, "max_redirects": 3}
    return SafeHttp(**{**limits, **overrides})


class FakeDns:
    """Answers the names it was given (successive calls get successive answers, the last repeats).

    IP literals go to the real resolver, which answers them without any lookup; any other name
    fails, so no test ever sends a DNS query.
    """

    def __init__(self) -> None:
        self.answers: dict[str, list[list[str]]] = {}
        self.calls: list[str] = []

    def set(self, name: str, *answers: list[str]) -> None:
        self.answers[name] = list(answers)

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if host in self.answers:
            self.calls.append(host)
            queue = self.answers[host]
            return [
                _addrinfo(ip, int(port)) for ip in (queue.pop(0) if len(queue) > 1 else queue[0])
            ]
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise socket.gaierror(socket.EAI_NONAME, f"fake DNS: no such name {host!r}") from None
        return _real_getaddrinfo(host, port, *args, **kwargs)


def _addrinfo(ip: str, port: int) -> tuple[Any, ...]:
    if ":" in ip:
        return (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0))
    return (socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDns:
    fake = FakeDns()
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return fake


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


@pytest.fixture
def no_connect(monkeypatch: pytest.MonkeyPatch, connects: list[Any]) -> list[Any]:
    """Records and refuses every connect, including through socket.create_connection."""

    def refuse(sock: socket.socket, address: Any) -> None:
        connects.append(address)
        raise ConnectionRefusedError(f"test guard: connect attempted to {address!r}")

    def refuse_create(address: Any, *args: Any, **kwargs: Any) -> None:
        connects.append(address)
        raise ConnectionRefusedError(f"test guard: create_connection to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse_create)
    return connects


def _is_loopback(address: Any) -> bool:
    try:
        return ipaddress.ip_address(address[0]) in LOOPBACK
    except (TypeError, ValueError, IndexError):
        return False


class Handler(BaseHTTPRequestHandler):
    server: LocalServer

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.hosts.append(self.headers.get("Host", ""))
        if self.path.startswith("/to/"):
            self.send_response(302)
            self.send_header("Location", self.path[len("/to/") :])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)


class LocalServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.hosts: list[str] = []
        self.sni: list[str | None] = []

    @property
    def port(self) -> int:
        return self.server_address[1]


def _serve(server: LocalServer) -> Iterator[LocalServer]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def server() -> Iterator[LocalServer]:
    yield from _serve(LocalServer())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _cert(
    subject: str, issuer: str, key: Any, signer: Any, extensions: list[Any]
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signer, hashes.SHA256())


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A private CA and a server certificate for images.test (and only that name)."""
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_ext = [
        (x509.BasicConstraints(ca=True, path_length=None), True),
        (x509.KeyUsage(False, False, False, False, False, True, True, False, False), True),
        (x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False),
    ]
    ca = _cert("test CA", "test CA", ca_key, ca_key, ca_ext)
    leaf_ext = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.SubjectAlternativeName([x509.DNSName("images.test")]), False),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False),
    ]
    leaf = _cert("images.test", "test CA", key, ca_key, leaf_ext)
    out = tmp_path_factory.mktemp("tls")
    pem = serialization.Encoding.PEM
    (out / "ca.pem").write_bytes(ca.public_bytes(pem))
    (out / "cert.pem").write_bytes(leaf.public_bytes(pem))
    (out / "key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return {"ca": out / "ca.pem", "cert": out / "cert.pem", "key": out / "key.pem"}


@pytest.fixture
def tls_server(tls_files: dict[str, Path]) -> Iterator[LocalServer]:
    """The same server behind TLS; it records the SNI name each client sent."""
    server = LocalServer()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls_files["cert"], tls_files["key"])
    context.sni_callback = lambda sock, name, ctx: server.sni.append(name)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    yield from _serve(server)


# Address classification


@pytest.mark.parametrize("address", NON_PUBLIC)
def test_non_public_addresses_are_special(address: str) -> None:
    assert is_special(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700::1111"])
def test_public_addresses_pass_the_check(address: str) -> None:
    check_address(ipaddress.ip_address(address), (), "http://example.com/")


def test_allowed_network_exempts_its_addresses_and_their_ipv4_mapped_form() -> None:
    check_address(ipaddress.ip_address("127.0.0.1"), ALLOW_LOOPBACK, "http://x/")
    check_address(ipaddress.ip_address("::ffff:127.0.0.1"), ALLOW_LOOPBACK, "http://x/")
    with pytest.raises(AccessDenied, match=re.escape("10.0.0.5")):
        check_address(ipaddress.ip_address("10.0.0.5"), ALLOW_LOOPBACK, "http://x/")


# SSRF refusal happens before any socket is connected


@pytest.mark.parametrize("address", NON_PUBLIC)
def test_host_resolving_to_non_public_address_is_refused_before_connecting(
    address: str, dns: FakeDns, no_connect: list[Any]
) -> None:
    dns.set("evil.test", [address])
    with pytest.raises(AccessDenied, match=re.escape("evil.test")):
        _http(timeout_s=0.5).get("http://evil.test/cat.jpg")
    assert no_connect == []


def test_one_non_public_answer_among_several_is_enough_to_refuse(
    dns: FakeDns, no_connect: list[Any]
) -> None:
    dns.set("mixed.test", ["93.184.216.34", "169.254.169.254"])
    with pytest.raises(AccessDenied, match=re.escape("169.254.169.254")):
        _http(timeout_s=0.5).get("https://mixed.test/cat.jpg")
    assert no_connect == []


def test_ip_literal_url_is_vetted_too(no_connect: list[Any]) -> None:
    with pytest.raises(AccessDenied):
        _http(timeout_s=0.5).get("http://[::ffff:169.254.169.254]/latest/meta-data/")
    assert no_connect == []


def test_unresolvable_host_is_not_found(dns: FakeDns, no_connect: list[Any]) -> None:
    with pytest.raises(NotFound, match=re.escape("nowhere.test")):
        _http(timeout_s=0.5).get("http://nowhere.test/cat.jpg")
    assert no_connect == []


@pytest.mark.parametrize(
    "url",
    [
        "http://user:secret@127.0.0.1/x",
        "http://127.0.0.1:99999/x",
        "ftp://127.0.0.1/x",
        "http:///x",
    ],
)
def test_malformed_or_unsupported_urls_are_invalid(url: str, no_connect: list[Any]) -> None:
    with pytest.raises(InvalidRequest):
        _http(allowed_networks=ALLOW_LOOPBACK).get(url)
    assert no_connect == []


# Pinning: the vetted answer is the one connected to


def test_request_uses_the_vetted_answer_even_if_dns_changes_afterwards(
    dns: FakeDns, server: LocalServer, connects: list[Any]
) -> None:
    dns.set("images.test", ["127.0.0.1"], ["10.0.0.5"])
    http = _http(allowed_networks=ALLOW_LOOPBACK, timeout_s=2)
    assert http.get(f"http://images.test:{server.port}/cat.jpg") == BODY
    assert dns.calls == ["images.test"]
    assert [address[0] for address in connects] == ["127.0.0.1"]
    assert server.hosts == [f"images.test:{server.port}"]


def test_each_request_vets_the_current_dns_answer(
    dns: FakeDns, server: LocalServer, connects: list[Any]
) -> None:
    dns.set("images.test", ["127.0.0.1"], ["10.0.0.5"])
    http = _http(allowed_networks=ALLOW_LOOPBACK, timeout_s=2)
    http.get(f"http://images.test:{server.port}/cat.jpg")
    with pytest.raises(AccessDenied, match=re.escape("10.0.0.5")):
        http.get(f"http://images.test:{server.port}/cat.jpg")
    assert len(connects) == 1


def test_redirect_to_a_name_resolving_to_the_metadata_address_is_refused(
    dns: FakeDns, server: LocalServer, connects: list[Any]
) -> None:
    dns.set("metadata.test", ["169.254.169.254"])
    http = _http(allowed_networks=ALLOW_LOOPBACK, timeout_s=2)
    url = f"http://127.0.0.1:{server.port}/to/http://metadata.test/latest/meta-data/"
    with pytest.raises(AccessDenied, match=re.escape("169.254.169.254")):
        http.get(url)
    assert all(_is_loopback(address) for address in connects)
    assert dns.calls == ["metadata.test"]


def test_redirect_to_a_file_uri_is_refused(server: LocalServer) -> None:
    http = _http(allowed_networks=ALLOW_LOOPBACK, timeout_s=2)
    with pytest.raises(InvalidRequest, match="file:///etc/passwd"):
        http.get(f"http://127.0.0.1:{server.port}/to/file:///etc/passwd")


# TLS: SNI and certificate check use the URL's host name, not the pinned IP


def test_https_verifies_the_certificate_for_the_host_name_while_connecting_to_the_ip(
    dns: FakeDns, tls_server: LocalServer, tls_files: dict[str, Path], connects: list[Any]
) -> None:
    dns.set("images.test", ["127.0.0.1"])
    http = _http(allowed_networks=ALLOW_LOOPBACK, timeout_s=2, ca_bundle=tls_files["ca"])
    assert http.get(f"https://images.test:{tls_server.port}/cat.jpg") == BODY
    assert tls_server.sni == ["images.test"]
    assert [address[0] for address in connects] == ["127.0.0.1"]


def test_https_refuses_a_certificate_issued_for_another_name(
    dns: FakeDns, tls_server: LocalServer, tls_files: dict[str, Path]
) -> None:
    dns.set("other.test", ["127.0.0.1"])
    http = _http(allowed_networks=ALLOW_LOOPBACK, timeout_s=2, ca_bundle=tls_files["ca"])
    with pytest.raises(AccessDenied, match="TLS"):
        http.get(f"https://other.test:{tls_server.port}/cat.jpg")


def test_https_refuses_a_certificate_from_an_unknown_ca(
    dns: FakeDns, tls_server: LocalServer
) -> None:
    dns.set("images.test", ["127.0.0.1"])
    http = _http(allowed_networks=ALLOW_LOOPBACK, timeout_s=2)
    with pytest.raises(AccessDenied, match="TLS"):
        http.get(f"https://images.test:{tls_server.port}/cat.jpg")


@pytest.mark.parametrize("url", ["http://[::1/x", "http://[::1", "https://[fec0::1/cat.jpg"])
def test_a_url_with_an_unclosed_ipv6_bracket_is_an_invalid_request(url: str) -> None:
    with pytest.raises(InvalidRequest, match="malformed URL"):
        _http().get(url)
