"""Hostile input against a real worker: garbage on the queue, image bombs and fakes, and
Redis URLs with passwords and TLS. Nothing crashes the worker; every bad input is accounted for.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest
import redis
from PIL import Image

from contract import keys, registry
from contract.messaging import TASK_NAME, make_celery
from demo.stack import RedisServer, free_port
from producer.client import Client
from tests.faults_support import (
    MODEL,
    SETTLE_S,
    ImageServer,
    Workers,
    account,
    outcome,
    plain_jpeg,
    producer_fixture,  # noqa: F401 (the producer fixture, shared by the fault tests)
    settle,
    small_jpeg,
    tiny_model_args,
)
from tests.support import make_jpeg, swapping_dir_for_symlink

_PASSWORD = "s3cret-Pa55"


@pytest.fixture
def model_args(tmp_path: Path) -> list[str]:
    return tiny_model_args(tmp_path / "model")


def _envelope(redis_url: str) -> dict:
    """A well-formed classify message, as the producer writes it onto the queue."""
    celery = make_celery(redis_url)
    celery.send_task(TASK_NAME, args=[["no-such-job"]], queue="scratch", routing_key="scratch")
    celery.close()
    client = redis.Redis.from_url(redis_url)
    raw = client.rpop("scratch")
    client.close()
    return json.loads(raw)


def _with_body(envelope: dict, body: bytes, content_type: str = "application/json") -> str:
    return json.dumps(
        {**envelope, "body": base64.b64encode(body).decode(), "content-type": content_type}
    )


def _with_task(envelope: dict, task: str) -> str:
    return _with_headers(envelope, task=task)


def _with_headers(envelope: dict, **headers: object) -> str:
    return json.dumps({**envelope, "headers": {**envelope["headers"], **headers}})


class _RunsCode:
    """Unpickling this creates ``marker``: proof that a pickle body was deserialised."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def _call(args: list, kwargs: dict | None = None) -> bytes:
    """A task message body (Celery protocol 2): [args, kwargs, options]."""
    return json.dumps([args, kwargs or {}, {}]).encode()


def _bad_messages(envelope: dict, marker: Path) -> list[tuple[bytes | str, str]]:
    """(raw message, words its dead-letter reason must contain), in queue order."""
    pickled = pickle.dumps(_RunsCode(marker))
    wrong_args = "not one list of job ID strings"
    return [
        ("this is not json", "not a kombu message"),
        (b"\xff\xfe\x00garbage", "not a kombu message"),
        ('{"hello": "world"}', "not a kombu message"),
        ("[1, 2, 3]", "not a kombu message"),
        ("null", "not a kombu message"),
        (_with_body(envelope, b"{not json"), "body is not JSON"),
        (_with_body(envelope, pickled, "application/x-python-serialize"), "not application/json"),
        (_with_task(envelope, "os.system"), "unknown task"),
        (_with_body(envelope, _call(["not-a-list"])), wrong_args),
        (_with_body(envelope, _call([[1, 2]])), wrong_args),
        (_with_body(envelope, _call([["a"], ["b"]])), wrong_args),
        (_with_body(envelope, _call([["a"]], {"x": 1})), wrong_args),
        (_with_body(envelope, b'{"args": 1}'), "not [args, kwargs, options]"),
        # Celery would drop the first silently and hold the second for a year.
        (_with_headers(envelope, expires="2000-01-01T00:00:00+00:00"), "sets expires="),
        (_with_headers(envelope, eta="2099-01-01T00:00:00+00:00"), "sets eta="),
    ]


def _queue(client: redis.Redis) -> str:
    """The normal-priority queue of the version the running worker serves."""
    info = registry.get_model(client, MODEL)
    assert info is not None
    return keys.queue_name(MODEL, info.version)


def _dead_letters(client: redis.Redis, count: int) -> list[dict]:
    deadline = time.monotonic() + SETTLE_S
    while client.llen(keys.dead_letter_key()) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return [json.loads(e) for e in client.lrange(keys.dead_letter_key(), 0, -1)]


def test_garbage_on_the_queue_is_dead_lettered_and_the_worker_keeps_serving(
    start_worker, model_args, producer: Client, redis_client: redis.Redis, tmp_path: Path
) -> None:
    worker = start_worker(MODEL, *model_args, "--allowed-root", str(tmp_path))
    marker = tmp_path / "pickle-ran"
    bad = _bad_messages(_envelope(worker.redis_url), marker)
    for raw, _ in bad:
        redis_client.lpush(_queue(redis_client), raw)
    entries = _dead_letters(redis_client, len(bad))
    assert len(entries) == len(bad), entries
    for entry, (raw, words) in zip(entries, bad, strict=True):
        assert words in entry["reason"], (raw, entry)
        assert entry["queue"] == _queue(redis_client)
    assert not marker.exists(), "a pickle body was deserialised"
    image = tmp_path / "good.jpg"
    image.write_bytes(small_jpeg())
    records = settle(producer, [j.id for j in producer.submit_many([str(image)] * 3, model=MODEL)])
    assert [r.status for r in records] == ["done"] * 3
    assert worker.proc.poll() is None, worker.log()


def test_a_message_of_thousands_of_unknown_ids_writes_one_dead_letter_entry(
    start_worker, model_args, producer: Client, redis_client: redis.Redis, tmp_path: Path
) -> None:
    start_worker(MODEL, *model_args, "--allowed-root", str(tmp_path))
    unknown = [f"unknown-{n}" for n in range(5000)]
    queue = _queue(redis_client)
    producer.celery.send_task(TASK_NAME, args=[unknown], queue=queue, routing_key=queue)

    (entry,) = _dead_letters(redis_client, 1)

    assert entry["missing"] == 5000 and entry["job_ids"] == unknown[:100]
    image = tmp_path / "good.jpg"
    image.write_bytes(small_jpeg())
    assert settle(producer, [producer.submit(str(image), model=MODEL).id])[0].status == "done"
    assert redis_client.llen(keys.dead_letter_key()) == 1


def _png_claiming(width: int, height: int) -> bytes:
    """A few hundred bytes whose header claims ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 999))
    )


def _hostile_files() -> dict[str, tuple[bytes, str]]:
    """File name -> (bytes, the error type its job must fail with)."""
    photo = make_jpeg(200, 150, seed=7)
    return {
        "bomb.png": (_png_claiming(50_000, 50_000), "too_large"),
        "over-limit.png": (_png_claiming(10_000, 10_000), "too_large"),
        "truncated.jpg": (photo[: len(photo) * 2 // 3], "not_an_image"),
        "header-only.jpg": (photo[:100], "not_an_image"),
        "php-polyglot.jpg": (b"\xff\xd8\xff\xe0" + b"<?php system($_GET['c']); ?>" * 4,
                             "not_an_image"),
        "gif-js-polyglot.gif": (b"GIF89a\x01\x00\x01\x00\x00\x00\x00;alert(1)//", "not_an_image"),
        "document.jpg": (b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n", "not_an_image"),
        "empty.jpg": (b"", "not_an_image"),
        "white.jpg": (plain_jpeg((255, 255, 255)), "internal"),
    }  # fmt: skip


def test_hostile_images_fail_alone_while_the_rest_of_their_batch_succeeds(
    start_worker, model_args, producer: Client, redis_client: redis.Redis, tmp_path: Path
) -> None:
    root = tmp_path / "images"
    root.mkdir()
    expected: dict[str, str] = {}
    for name, (data, error) in _hostile_files().items():
        (root / name).write_bytes(data)
        expected[str(root / name)] = error
    for n in range(40):
        (root / f"good{n}.jpg").write_bytes(small_jpeg(seed=n))
        expected[str(root / f"good{n}.jpg")] = "done"
    # One message, and a batch wait long enough that its jobs meet in one forward pass.
    start_worker(MODEL, *model_args, "--allowed-root", str(root), "--max-wait-ms", "1000")
    uris = sorted(expected)
    jobs = producer.submit_many(uris, model=MODEL)
    records = settle(producer, [j.id for j in jobs])
    assert {r.uri: outcome(r) for r in records} == expected
    tally = account("hostile-images", redis_client, records)
    assert (tally.done, tally.failed, tally.lost) == (40, len(expected) - 40, 0)


def test_a_password_in_the_redis_url_works_and_stays_out_of_the_log(
    model_args: list[str], tmp_path: Path, torch_home: str
) -> None:
    server = RedisServer(tmp_path, password=_PASSWORD).start()
    try:
        _classify_through(server.url, model_args, tmp_path, torch_home)
    finally:
        server.stop()


def _classify_through(url: str, model_args: list[str], tmp_path: Path, torch_home: str) -> None:
    """Start a worker and a producer on ``url``; one job must come back done."""
    (tmp_path / "a.jpg").write_bytes(small_jpeg())
    args = [*model_args, "--allowed-root", str(tmp_path)]
    with Workers(url, tmp_path, torch_home, args) as workers:
        worker = workers.start()
        producer = Client.from_url(url)
        job = producer.submit(str(tmp_path / "a.jpg"), model=MODEL)
        assert producer.wait(job.id, SETTLE_S).status == "done"
        producer.close()
    assert _PASSWORD not in worker.log()


def _openssl(args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args.split()], cwd=cwd, check=True, capture_output=True)


def _tls_files(directory: Path) -> dict[str, Path]:
    """A private CA and a server certificate for 127.0.0.1, made with the openssl CLI."""
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    key = "-newkey rsa:2048 -nodes"
    _openssl(f"req -x509 {key} -days 1 -subj /CN=test-ca -keyout ca-key.pem -out ca.pem", directory)
    _openssl(f"req {key} -subj /CN=127.0.0.1 -keyout key.pem -out req.pem", directory)
    _openssl(
        "x509 -req -in req.pem -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 1 "
        "-extfile san.cnf -out cert.pem",
        directory,
    )
    return {name: directory / f"{name}.pem" for name in ("ca", "cert", "key")}


def test_a_rediss_url_with_a_private_ca_works(
    model_args: list[str], tmp_path: Path, torch_home: str
) -> None:
    tls = _tls_files(tmp_path)
    port = free_port()
    server = RedisServer(tmp_path, password=_PASSWORD)
    server.start(
        "--tls-port", str(port), "--tls-cert-file", str(tls["cert"]), "--tls-key-file",
        str(tls["key"]), "--tls-ca-cert-file", str(tls["ca"]), "--tls-auth-clients", "no",
    )  # fmt: skip
    url = (
        f"rediss://:{_PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={tls['ca']}"
    )
    try:
        _classify_through(url, model_args, tmp_path, torch_home)
    finally:
        server.stop()


def _png(width: int, height: int) -> bytes:
    """A valid PNG of one colour: a few hundred bytes, however many pixels."""
    out = io.BytesIO()
    Image.new("RGB", (width, height), (40, 160, 90)).save(out, format="PNG")
    return out.getvalue()


# Thin images: each would become tens of millions of pixels or more once resized (short side 32).
_THIN = {"1x20000": (1, 20_000), "20000x1": (20_000, 1), "1x100000": (1, 100_000),
         "100000x1": (100_000, 1)}  # fmt: skip


def test_thin_images_fail_fast_as_too_large_and_the_worker_keeps_serving(
    start_worker, model_args, producer: Client, redis_client: redis.Redis, tmp_path: Path
) -> None:
    root = tmp_path / "images"
    root.mkdir()
    uris = []
    for name, size in _THIN.items():
        (root / f"{name}.png").write_bytes(_png(*size))
        uris.append(str(root / f"{name}.png"))
    for n in range(20):
        (root / f"good{n}.jpg").write_bytes(small_jpeg(seed=n))
        uris.append(str(root / f"good{n}.jpg"))
    worker = start_worker(MODEL, *model_args, "--allowed-root", str(root))
    records = settle(producer, [j.id for j in producer.submit_many(uris, model=MODEL)])
    by_uri = {r.uri: r for r in records}
    for name in _THIN:
        record = by_uri[str(root / f"{name}.png")]
        assert (outcome(record), record.attempts) == ("too_large", 1)
        assert "aspect ratio" in record.error.message
    tally = account("thin-images", redis_client, records)
    assert (tally.done, tally.failed, tally.executed_twice, tally.lost) == (20, len(_THIN), 0, 0)
    assert worker.proc.poll() is None, worker.log()


def test_a_source_that_drips_fails_at_the_fetch_deadline_and_never_as_poison(
    start_worker, model_args, producer: Client, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Two URLs that send a byte every 0.2 s, on a worker taking two messages at once: each
    fails at the deadline as deadline_exceeded, once, while the good jobs behind them finish."""
    root = tmp_path / "images"
    root.mkdir()
    good = []
    for n in range(20):
        (root / f"good{n}.jpg").write_bytes(small_jpeg(seed=n))
        good.append(str(root / f"good{n}.jpg"))
    start_worker(
        MODEL, *model_args, "--allowed-root", str(root), "--http-allow-network", "127.0.0.0/8",
        "--concurrency", "2", "--fetch-deadline-s", "2",
    )  # fmt: skip
    with ImageServer() as server:
        drips = [producer.submit(f"{server.base}/hold/{n}", model=MODEL) for n in range(2)]
        server.wait_arrivals("hold", 2)
        jobs = [*drips, *producer.submit_many(good, model=MODEL)]
        records = settle(producer, [j.id for j in jobs])
        server.release()
    for record in records[:2]:
        assert (outcome(record), record.attempts) == ("deadline_exceeded", 1), record
    assert [outcome(r) for r in records[2:]] == ["done"] * len(good)
    tally = account("slow-drip", redis_client, records)
    assert (tally.failed, tally.executed_twice, tally.redelivered, tally.lost) == (2, 0, 0, 0)


@pytest.mark.slow
def test_swapping_a_directory_for_a_symlink_outside_never_lets_a_job_read_outside(
    start_worker, model_args, producer: Client, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """While a process swaps root/dir for a symlink to a directory outside the root as fast as
    it can, 300 jobs read root/dir/cat.jpg. The file outside is a bomb (too_large if ever read):
    every job ends done or refused (access_denied, not_found), none too_large."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "dir").mkdir(parents=True)
    outside.mkdir()
    (root / "dir" / "cat.jpg").write_bytes(small_jpeg())
    (outside / "cat.jpg").write_bytes(_png_claiming(50_000, 50_000))
    start_worker(MODEL, *model_args, "--allowed-root", str(root))
    with swapping_dir_for_symlink(root, outside):
        jobs = producer.submit_many([str(root / "dir" / "cat.jpg")] * 300, model=MODEL)
        records = settle(producer, [j.id for j in jobs])
    outcomes = {outcome(r) for r in records}
    assert outcomes <= {"done", "access_denied", "not_found"}, outcomes
    # A refusal names the job's own URI only: nothing about what lies outside the root.
    assert not [r for r in records if r.error and str(outside) in r.error.message]
    tally = account("path-race", redis_client, records)
    assert (tally.executed_twice, tally.lost) == (0, 0)
