"""Webhooks: each final job's record is POSTed to its callback_url, signed as Standard Webhooks
describes, retried until delivered, and never sent to a private address.

Every socket these tests open goes to 127.0.0.1: the receivers listen there, host names are
answered by a stub resolver, and a guard on ``socket.socket.connect`` records every connect.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import random
import socket
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

from contract import keys
from contract.batch import BatchSpec
from contract.job import ErrorInfo, Job, Prediction
from contract.store import JobStore
from notifier.delivery import Poster
from notifier.schedule import backoff_s, read_dead
from notifier.service import Notifier, NotifierSettings
from notifier.signing import Signer, check_secret
from producer.client import Client, SubmitRequest
from tests.faults_support import (
    MODEL,
    SETTLE_S,
    model_args_fixture,  # noqa: F401 (the model_args fixture, shared by the fault tests)
    wait_until,
)
from tests.support import write_images
from tests.support_services import SPEC_SECRET, Receiver, Sender

SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = '{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
_real_connect = socket.socket.connect
_real_getaddrinfo = socket.getaddrinfo


# -- a loopback receiver --------------------------------------------------------------------


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


def test_each_job_of_an_entry_gets_its_webhook_and_the_entry_is_acknowledged_once(
    redis_client: redis.Redis,
) -> None:
    store = JobStore(redis_client)
    jobs = [
        Job(id=f"j{n}", uri="/x.jpg", model=MODEL, top_k=1, callback_url=url)
        for n, url in enumerate(["http://hooks.example/", None, "http://other.example/"])
    ]
    store.create_many(jobs)
    store.finish_many([j.done([Prediction("a", 0, 1.0)], "w", False, time.time()) for j in jobs])
    assert redis_client.xlen(keys.events_stream()) == 1  # one store call, one entry
    notifier = _notifier(redis_client)
    notifier.setup()
    assert notifier.take_events() == 1
    assert redis_client.xpending(keys.events_stream(), notifier.settings.group)["pending"] == 0
    due = sorted(keys.text(m) for m in redis_client.zrange(keys.webhook_due_key(), 0, -1))
    assert due == ["j0:done", "j2:done"]


@pytest.mark.parametrize("consumer", ["same", "another"])
def test_events_read_by_a_sender_that_died_are_scheduled_by_the_next(
    redis_client: redis.Redis, consumer: str
) -> None:
    _finish(redis_client, "http://hooks.example/")
    dying = _notifier(redis_client, consumer="same")
    dying.setup()
    assert len(dying.events.read(">", 10, None)) == 1  # read, then killed before scheduling it
    # "another" takes it over once it has been idle claim_idle_s (here at once)
    successor = _notifier(redis_client, consumer=consumer, claim_idle_s=0)
    assert successor.take_events() == 1
    assert redis_client.zcard(keys.webhook_due_key()) == 1
    assert redis_client.xpending(keys.events_stream(), successor.settings.group)["pending"] == 0


# -- the whole service ----------------------------------------------------------------------


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    return write_images(tmp_path / "images", 20, width=48, height=48)


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
            batches = {f"{r.batch}/batch:finished" for r in expected.values()}
            wanted = expected.keys() | batches
            wait_until(lambda: receiver.delivered().keys() >= wanted, "every webhook")
            assert sender.stop() == 0
        finally:
            if sender.proc and sender.proc.poll() is None:
                sender.kill()
            producer.close()
    assert len(expected) == len(ids)
    assert Counter(r.status for r in expected.values()) == {"done": 25, "failed": 1}
    assert {p.verified for p in receiver.posts} == {True}
    # Each submit_many was a batch with the callback_url: one webhook more each, when finished.
    assert len(batches) == 2
    assert {
        p.webhook_id for p in receiver.posts
    } == expected.keys() | batches  # duplicates: same IDs
    assert min(Counter(p.webhook_id for p in receiver.posts).values()) >= 3  # 500, 500, 204
    for post in receiver.posts:  # a retry or duplicate carries the same record as the first
        if post.webhook_id not in batches:
            assert json.loads(post.body) == expected[post.webhook_id].to_dict()
    assert read_dead(redis_client) == []
    assert redis_client.zcard(keys.webhook_due_key()) == 0


def test_a_finished_batch_gets_one_signed_webhook_with_its_counts(
    redis_client: redis.Redis, connects: list[Any]
) -> None:
    store = JobStore(redis_client)
    with Receiver(fail_first=1) as receiver:
        jobs = [
            Job(id=f"b-{n}", uri="/x.jpg", model=MODEL, top_k=1, batch="nightly") for n in range(3)
        ]
        store.create_many(jobs, BatchSpec("nightly", callback_url=receiver.url))
        notifier = _notifier(redis_client, LOOPBACK)
        now = time.time()
        store.finish_many([j.done([Prediction("a", 0, 1.0)], "w", False, now) for j in jobs[:2]])
        notifier.setup()
        notifier.take_events()  # two job events, no webhook for them (no callback_url)
        assert redis_client.zcard(keys.webhook_due_key()) == 0
        store.finish_many([jobs[2].failed(ErrorInfo("not_found", "gone"), now)])
        store.finish_many([jobs[2].failed(ErrorInfo("not_found", "gone"), now)])  # a duplicate
        _run_until(notifier, receiver.delivered)
    assert [(p.webhook_id, p.verified, p.answered) for p in receiver.posts] == [
        ("nightly/batch:finished", True, 500),
        ("nightly/batch:finished", True, 204),
    ]
    body = json.loads(receiver.posts[-1].body)
    assert (body["id"], body["total"], body["pending"]) == ("nightly", 3, 0)
    assert body["counts"] == {"done": 2, "failed": 1, "cancelled": 0, "expired": 0}
    assert body["finished"] is not None
    assert read_dead(redis_client) == []
