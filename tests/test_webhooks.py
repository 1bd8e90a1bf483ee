"""Webhooks: each final job's record is POSTed to its callback_url, signed as Standard Webhooks
describes, retried until delivered, and never sent to a private address.

Every socket these tests open goes to 127.0.0.1: the receivers listen there, host names are
answered by a stub resolver, and a guard on ``socket.socket.connect`` records every connect.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from standardwebhooks import Webhook, WebhookVerificationError

from contract import keys
from contract.job import Job, Prediction
from contract.store import JobStore
from notifier.delivery import Poster
from notifier.schedule import backoff_s, read_dead
from notifier.service import Notifier, NotifierSettings
from notifier.signing import Signer, check_secret
from producer.client import Client, SubmitRequest
from tests.faults_support import (
    MODEL,
    SETTLE_S,
    LoopbackServer,
    model_args_fixture,  # noqa: F401 (the model_args fixture, shared by the fault tests)
    wait_until,
)
from tests.support import ROOT, write_images

# The example of the Standard Webhooks specification (and of every library implementing it).
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = '{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
_real_connect = socket.socket.connect
_real_getaddrinfo = socket.getaddrinfo


# -- a loopback receiver --------------------------------------------------------------------


@dataclass(frozen=True)
class Post:
    webhook_id: str
    verified: bool
    body: str
    answered: int


class Receiver(LoopbackServer):
    """Verifies each POST's signature and counts it; answers 500 to the first ``fail_first``
    POSTs of each webhook-id, and may hold the very first POST until ``release``."""

    def __init__(self, fail_first: int = 0, hold_first: bool = False) -> None:
        self.fail_first = fail_first
        self.posts: list[Post] = []
        self.held = threading.Event()  # set once the first POST arrived (and is held)
        self.released = threading.Event()
        if not hold_first:
            self.released.set()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.handle_error = lambda *_: None  # type: ignore[method-assign]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def answer(self, headers: dict[str, str], body: str) -> int:
        try:
            Webhook(SPEC_SECRET).verify(body, headers)
            verified = True
        except WebhookVerificationError:
            verified = False
        with self._lock:
            webhook_id = headers.get("webhook-id", "")
            tries = sum(p.webhook_id == webhook_id for p in self.posts) + 1
            status = 401 if not verified else 500 if tries <= self.fail_first else 204
            first = not self.posts
            self.posts.append(Post(webhook_id, verified, body, status))
        if first:
            self.held.set()
            self.released.wait(SETTLE_S)
        return status

    def delivered(self) -> dict[str, str]:
        """Body by webhook-id, of every POST answered 2xx."""
        with self._lock:
            return {p.webhook_id: p.body for p in self.posts if p.answered < 300}


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length)
            if len(raw) < length:
                return  # cut short by a sender killed mid-POST: dropped, as any server would
            body = raw.decode()
            status = receiver.answer({k.lower(): v for k, v in self.headers.items()}, body)
            with contextlib.suppress(OSError):  # the sender may have been killed meanwhile
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


# -- signing --------------------------------------------------------------------------------


def test_the_signature_matches_the_specifications_example() -> None:
    headers = Signer(SPEC_SECRET).headers(SPEC_ID, SPEC_BODY, SPEC_TIMESTAMP)
    assert headers == {
        "webhook-id": SPEC_ID,
        "webhook-timestamp": str(SPEC_TIMESTAMP),
        "webhook-signature": SPEC_SIGNATURE,
    }


@pytest.mark.parametrize("secret", ["hunter2", "whsec_not base64!", "whsec_c2hvcnQ="])
def test_a_bad_secret_is_refused_at_startup_saying_how_to_make_one(secret: str) -> None:
    with pytest.raises(ValueError, match="new-secret"):
        check_secret(secret)


def test_retries_back_off_exponentially_with_jitter_up_to_the_cap() -> None:
    rng = random.Random(7)
    for attempts in range(1, 12):
        ceiling = min(60.0, 5.0 * 2 ** (attempts - 1))
        assert ceiling / 2 <= backoff_s(attempts, 5.0, 60.0, rng) <= ceiling


# -- the sender, in this process ------------------------------------------------------------


class Resolver:
    """Answers the names it knows, hands IP literals to the real resolver, fails the rest."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if host in self.names:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (self.names[host], port))]
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(host)
            return _real_getaddrinfo(host, port, *args, **kwargs)
        raise socket.gaierror(socket.EAI_NONAME, f"test resolver does not know {host!r}")


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Every connect this process attempts; one outside 127.0.0.0/8 is refused."""
    seen: list[Any] = []

    def guarded(sock: socket.socket, address: Any) -> None:
        seen.append(address)
        if isinstance(address, tuple) and ipaddress.ip_address(address[0]) not in LOOPBACK[0]:
            raise ConnectionRefusedError(f"test guard: no connect outside loopback: {address!r}")
        _real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    names = {"metadata.example": "169.254.169.254", "intranet.example": "10.0.0.5"}
    monkeypatch.setattr(socket, "getaddrinfo", Resolver(names))
    return seen


def _notifier(client: redis.Redis, allowed: tuple[Any, ...] = (), **settings: Any) -> Notifier:
    poster = Poster(allowed, timeout_s=5)
    fast = {"retry_base_s": 0.01, "retry_max_s": 0.05, "timeout_s": 5, **settings}
    return Notifier(client, Signer(SPEC_SECRET), poster, NotifierSettings(**fast))


def _finish(client: redis.Redis, callback_url: str, job_id: str = "job-1") -> Job:
    store = JobStore(client)
    job = Job(id=job_id, uri="/x.jpg", model=MODEL, top_k=1, callback_url=callback_url)
    store.create_many([job])
    final = job.done([Prediction("a", 0, 1.0)], "w", False, time.time())
    store.finish_many([final])
    return final


def _run_until(notifier: Notifier, done: Any) -> None:
    notifier.setup()
    with ThreadPoolExecutor(4) as pool:

        def step() -> bool:
            notifier.take_events()
            notifier.deliver_due(pool)
            return bool(done())

        wait_until(step, "the webhook to settle")


@pytest.mark.parametrize(
    "url",
    [
        "http://metadata.example/latest/meta-data/",
        "http://169.254.169.254/latest/meta-data/",
        "http://intranet.example/hook",
        "http://10.0.0.5/hook",
        "http://[::1]/hook",
        "http://127.0.0.1:9/hook",  # loopback too, unless an operator allowed it
    ],
)
def test_a_private_callback_is_refused_before_any_connection_and_given_up(
    redis_client: redis.Redis, connects: list[Any], url: str
) -> None:
    _finish(redis_client, url)
    notifier = _notifier(redis_client)
    _run_until(notifier, lambda: read_dead(redis_client))
    (dead,) = read_dead(redis_client)
    assert dead["webhook_id"] == "job-1:done"
    assert dead["attempts"] == 1
    assert str(dead["error"]).startswith("access_denied")
    assert [a for a in connects if ipaddress.ip_address(a[0]) not in LOOPBACK[0]] == []
    assert [a for a in connects if a[1] in (80, 9)] == []  # not even loopback's port 9
    assert redis_client.zcard(keys.webhook_due_key()) == 0


def test_a_failing_receiver_gets_the_webhook_again_until_it_takes_it(
    redis_client: redis.Redis, connects: list[Any]
) -> None:
    with Receiver(fail_first=3) as receiver:
        final = _finish(redis_client, receiver.url)
        notifier = _notifier(redis_client, LOOPBACK)
        _run_until(notifier, receiver.delivered)
    assert [(p.webhook_id, p.verified, p.answered) for p in receiver.posts] == [
        ("job-1:done", True, 500),
        ("job-1:done", True, 500),
        ("job-1:done", True, 500),
        ("job-1:done", True, 204),
    ]
    assert {json.loads(p.body) == final.to_dict() for p in receiver.posts} == {True}
    assert redis_client.zcard(keys.webhook_due_key()) == 0
    assert redis_client.hlen(keys.webhook_state_key()) == 0
    assert read_dead(redis_client) == []


def test_cancelled_and_expired_jobs_get_their_webhook_too(
    redis_client: redis.Redis, connects: list[Any]
) -> None:
    store = JobStore(redis_client)
    with Receiver() as receiver:
        now = time.time()
        jobs = [
            Job(id="gone", uri="/x.jpg", model=MODEL, top_k=1, callback_url=receiver.url),
            Job(id="late", uri="/y.jpg", model=MODEL, top_k=1, callback_url=receiver.url,
                submitted=now - 2, deadline=now - 1),
        ]  # fmt: skip
        store.create_many(jobs)
        store.cancel_many(["gone"], now)
        store.claim_many(["late"], MODEL, now, "w", fresh_only=True)
        notifier = _notifier(redis_client, LOOPBACK)
        _run_until(notifier, lambda: len(receiver.delivered()) == 2)
    delivered = receiver.delivered()
    assert sorted(delivered) == ["gone:cancelled", "late:expired"]
    assert all(p.verified for p in receiver.posts)
    assert json.loads(delivered["gone:cancelled"]) == store.get("gone").to_dict()  # type: ignore[union-attr]
    assert json.loads(delivered["late:expired"])["status"] == "expired"


def test_a_webhook_failing_past_its_max_age_is_given_up_and_recorded(
    redis_client: redis.Redis, connects: list[Any]
) -> None:
    with Receiver(fail_first=10**6) as receiver:
        _finish(redis_client, receiver.url)
        notifier = _notifier(redis_client, LOOPBACK, max_age_s=0)
        _run_until(notifier, lambda: read_dead(redis_client))
    (dead,) = read_dead(redis_client)
    assert (dead["webhook_id"], dead["attempts"], dead["url"]) == ("job-1:done", 1, receiver.url)
    assert str(dead["error"]).startswith("HTTP 500")
    assert redis_client.zcard(keys.webhook_due_key()) == 0


def test_an_event_is_acknowledged_once_its_webhook_is_scheduled(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    quiet = Job(id="quiet", uri="/x.jpg", model=MODEL, top_k=1)
    store.create_many([quiet])
    store.finish_many([quiet.done([Prediction("a", 0, 1.0)], "w", False, time.time())])
    _finish(redis_client, "http://hooks.example/", job_id="loud")
    notifier = _notifier(redis_client)
    notifier.setup()
    assert notifier.take_events() == 2
    pending = redis_client.xpending(keys.events_stream(), notifier.settings.group)
    assert pending["pending"] == 0
    assert [keys.text(m) for m in redis_client.zrange(keys.webhook_due_key(), 0, -1)] == [
        "loud:done"
    ]


@pytest.mark.parametrize("consumer", ["same", "another"])
def test_events_read_by_a_sender_that_died_are_scheduled_by_the_next(
    redis_client: redis.Redis, consumer: str
) -> None:
    _finish(redis_client, "http://hooks.example/")
    dying = _notifier(redis_client, consumer="same")
    dying.setup()
    assert len(dying._read(">", None)) == 1  # read, then killed before scheduling it
    # "another" takes it over once it has been idle claim_idle_s (here at once)
    successor = _notifier(redis_client, consumer=consumer, claim_idle_s=0)
    assert successor.take_events() == 1
    assert redis_client.zcard(keys.webhook_due_key()) == 1
    assert redis_client.xpending(keys.events_stream(), successor.settings.group)["pending"] == 0


# -- the whole service ----------------------------------------------------------------------


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    return write_images(tmp_path / "images", 20, width=48, height=48)


class Sender:
    """``python -m notifier run`` as its own process, as an operator starts it."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "IMGCLS_WEBHOOK_SECRET": SPEC_SECRET, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "notifier", "run", "--redis-url", self.redis_url,
                "--allow-network", "127.0.0.0/8", "--retry-base-s", "0.2", "--retry-max-s", "1",
                "--timeout-s", "5", "--consumer", "test-sender",
            ],
            env=env,
            cwd=ROOT,
        )  # fmt: skip

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(SETTLE_S)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(SETTLE_S)


def test_every_final_job_is_delivered_signed_across_a_killed_sender(
    start_worker: Any,
    model_args: list[str],
    images: list[Path],
    redis_url: str,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    start_worker(MODEL, *model_args)
    producer = Client.from_url(redis_url)
    sender = Sender(redis_url)
    missing = str(images[0].parent / "missing.jpg")  # a job that fails gets its webhook too
    with Receiver(fail_first=2, hold_first=True) as receiver:
        requests = [SubmitRequest(str(p)) for p in images] + [SubmitRequest(missing)]
        ids = [j.id for j in producer.submit_many(requests, model=MODEL, callback_url=receiver.url)]
        sender.start()
        try:
            receiver.held.wait(SETTLE_S)
            sender.kill()  # while a POST is in flight and others wait to be retried
            receiver.released.set()
            late = producer.submit_many(
                [str(p) for p in images[:5]], model=MODEL, callback_url=receiver.url
            )  # finished while no sender runs: their events wait in the stream
            ids += [j.id for j in late]
            records = producer.wait_many(ids, SETTLE_S)
            expected = {f"{r.id}:{r.status}": r for r in records if r is not None}
            sender.start()
            wait_until(lambda: receiver.delivered().keys() >= expected.keys(), "every webhook")
            assert sender.stop() == 0
        finally:
            if sender.proc and sender.proc.poll() is None:
                sender.kill()
            producer.close()
    assert len(expected) == len(ids)
    assert Counter(r.status for r in expected.values()) == {"done": 25, "failed": 1}
    assert {p.verified for p in receiver.posts} == {True}
    assert {p.webhook_id for p in receiver.posts} == expected.keys()  # duplicates: same IDs
    assert min(Counter(p.webhook_id for p in receiver.posts).values()) >= 3  # 500, 500, 204
    for post in receiver.posts:  # a retry or duplicate carries the same record as the first
        assert json.loads(post.body) == expected[post.webhook_id].to_dict()
    assert read_dead(redis_client) == []
    assert redis_client.zcard(keys.webhook_due_key()) == 0
