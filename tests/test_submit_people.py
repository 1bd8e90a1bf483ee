"""What a person submitting jobs relies on: a reused ID never silently stands for another
request, relative paths mean the caller's directory, and `submit --wait` streams, survives
Ctrl-C without losing a job ID and exits with a status that says how it went.

Real redis-server; a model registered with no worker, so jobs stay queued until the test
finishes them through the store as a worker would."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from queue import Empty, Queue

import pytest
import redis

from contract import defaults, keys, registry
from contract.errors import IdConflict, NotFound
from contract.job import ErrorInfo, Job
from contract.shards import ShardedStore
from producer.bulk import in_input_order
from producer.client import Client, SubmitRequest, message_sizes
from tests.support import ROOT, producer_help
from tests.support_gateway import register_idle_model

IDLE = "idle-model"
# Hang guard only: how long a test waits for a line or a record that should come.
HANG_S = 60


@pytest.fixture
def client(redis_url: str) -> Iterator[Client]:
    register_idle_model(redis_url, IDLE)
    client = Client.from_url(redis_url)
    yield client
    client.close()


def test_resubmitting_an_id_with_the_same_request_returns_the_existing_record(
    client: Client,
) -> None:
    first = client.submit("/data/a.jpg", model=IDLE, top_k=3, job_id="same")
    client.store.finish_many([first.failed(ErrorInfo("not_found", "gone"), time.time())])

    again = client.submit("/data/a.jpg", model=IDLE, top_k=3, job_id="same")

    assert again.status == "failed" and again.submitted == first.submitted


@pytest.mark.parametrize(
    "changed", [{"uri": "/data/b.jpg"}, {"top_k": 4}, {"model": "other-model"}]
)
def test_resubmitting_an_id_with_a_different_request_is_refused(
    client: Client, redis_url: str, changed: dict[str, object]
) -> None:
    register_idle_model(redis_url, "other-model")
    client.submit("/data/a.jpg", model=IDLE, top_k=3, job_id="taken")
    request: dict[str, object] = {"uri": "/data/a.jpg", "model": IDLE, "top_k": 3, **changed}

    with pytest.raises(IdConflict) as refused:
        client.submit(request.pop("uri"), job_id="taken", **request)  # type: ignore[arg-type]

    assert refused.value.type == "conflict" and "'taken'" in str(refused.value)
    assert client.get("taken").uri == "/data/a.jpg"


def test_a_conflict_refuses_the_whole_batch_before_anything_is_queued(
    client: Client, redis_client: redis.Redis
) -> None:
    old = client.submit("/data/a.jpg", model=IDLE, job_id="old")
    queue = keys.queue_name(IDLE, old.version or "")
    before = redis_client.llen(queue)
    batch = [SubmitRequest("/data/new.jpg", "new"), SubmitRequest("/data/other.jpg", "old")]
    twice = [SubmitRequest("/data/x.jpg", "dup"), SubmitRequest("/data/y.jpg", "dup")]

    with pytest.raises(IdConflict):
        client.submit_many(batch, model=IDLE)
    with pytest.raises(IdConflict):
        client.submit_many(twice, model=IDLE)

    assert client.get_many(["new", "dup"]) == [None, None]
    assert redis_client.llen(queue) == before


def test_a_relative_path_is_made_absolute_against_the_callers_directory(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    uris = ["cats/a.jpg", "/abs/b.jpg", "s3://bucket/c.jpg", "https://example.test/d.jpg"]

    jobs = client.submit_many(uris, model=IDLE)

    assert [j.uri for j in jobs] == [str(tmp_path / "cats/a.jpg"), *uris[1:]]


def test_in_input_order_releases_each_record_once_every_earlier_one_came() -> None:
    finished = [("c", None), ("a", None), ("d", None), ("b", None)]
    seen: list[str] = []

    for job_id, _ in in_input_order(["a", "b", "c", "d"], iter(finished)):
        seen.append(job_id)

    assert seen == ["a", "b", "c", "d"]
    assert [i for i, _ in in_input_order("abc", [("b", None), ("a", None)])] == ["a", "b"]


# -- the CLI ---------------------------------------------------------------------------


def _producer(redis_url: str, *args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "producer", args[0], "--redis-url", redis_url, *args[1:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _lines(stream: object) -> Queue[str]:
    """The stream's lines as they come, read on a thread so that a test never blocks on it."""
    lines: Queue[str] = Queue()

    def read() -> None:
        for line in stream:  # type: ignore[attr-defined]
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    return lines


def _queued_records(store: ShardedStore, uris: list[str]) -> dict[str, Job]:
    """The records of ``uris`` once the CLI has queued them all (by URI)."""
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline:
        prefix = keys.job_key("")
        found_keys = [k.decode() for c in store.clients for k in c.scan_iter(prefix + "*")]
        ids = [k.removeprefix(prefix) for k in found_keys]
        found = {j.uri: j for j in store.get_many(ids) if j is not None and j.uri in uris}
        if len(found) == len(uris):
            return found
        time.sleep(0.05)
    raise TimeoutError(f"the CLI did not queue {uris}")


def _finish(store: ShardedStore, job: Job) -> None:
    store.finish_many([job.failed(ErrorInfo(NotFound.type, "test"), time.time())])


def test_submit_wait_prints_each_record_as_it_finishes_and_ctrl_c_prints_the_rest(
    redis_url: str, client: Client, tmp_path: Path
) -> None:
    names = ["a.jpg", "b.jpg", "c.jpg"]
    uris = [str(tmp_path / n) for n in names]  # relative on the command line
    run = _producer(redis_url, "submit", "--model", IDLE, "--wait", "600", *names, cwd=tmp_path)
    stdout = _lines(run.stdout)
    jobs = _queued_records(client.store, uris)

    _finish(client.store, jobs[uris[1]])
    first = json.loads(stdout.get(timeout=HANG_S))
    still_running = run.poll() is None
    run.send_signal(signal.SIGINT)
    rc = run.wait(timeout=HANG_S)

    rest = [json.loads(stdout.get(timeout=HANG_S)) for _ in range(2)]
    assert first["uri"] == uris[1] and first["status"] == "failed" and still_running
    assert rc == 130
    assert [(r["uri"], r["status"]) for r in rest] == [(uris[0], "queued"), (uris[2], "queued")]
    assert {r["id"] for r in [first, *rest]} == {j.id for j in jobs.values()}
    with pytest.raises(Empty):
        stdout.get(timeout=0.5)


def test_submit_wait_ordered_holds_a_record_until_every_earlier_one_is_printed(
    redis_url: str, client: Client, tmp_path: Path
) -> None:
    uris = [str(tmp_path / n) for n in ("a.jpg", "b.jpg")]
    run = _producer(
        redis_url, "submit", "--model", IDLE, "--wait", "600", "--ordered", *uris, cwd=tmp_path
    )
    stdout = _lines(run.stdout)
    jobs = _queued_records(client.store, uris)

    _finish(client.store, jobs[uris[1]])
    _finish(client.store, jobs[uris[0]])
    rc = run.wait(timeout=HANG_S)

    records = [json.loads(stdout.get(timeout=HANG_S)) for _ in uris]
    assert [r["uri"] for r in records] == uris
    assert rc == 1  # both failed


def test_submit_exits_5_when_jobs_are_unfinished_at_the_timeout(
    redis_url: str, client: Client, tmp_path: Path
) -> None:
    run = _producer(redis_url, "submit", "--model", IDLE, "--wait", "0", "x.jpg", cwd=tmp_path)
    out, err = run.communicate(timeout=HANG_S)

    assert run.returncode == 5, err
    assert json.loads(out)["status"] == "queued"


def test_result_of_an_unknown_id_prints_a_not_found_record_and_fails(
    redis_url: str, client: Client, tmp_path: Path
) -> None:
    known = client.submit("/data/k.jpg", model=IDLE, job_id="known")
    _finish(client.store, known)

    run = _producer(redis_url, "result", "known", "never-submitted", cwd=tmp_path)
    out, err = run.communicate(timeout=HANG_S)

    records = [json.loads(line) for line in out.splitlines()]
    assert run.returncode == 1, err
    assert records[0]["id"] == "known" and records[0]["status"] == "failed"
    assert records[1]["id"] == "never-submitted" and records[1]["status"] is None
    assert records[1]["error"]["type"] == "not_found"


@pytest.mark.parametrize("command", ["submit", "result"])
def test_help_documents_the_exit_statuses(command: str) -> None:
    text = producer_help(command)

    assert "Exit status" in text
    assert all(f"{code} " in text for code in ("0", "1", "5"))


@pytest.mark.parametrize(
    ("jobs", "most", "sizes"),
    [
        (0, 256, []),
        (1, 256, [1]),
        (100, 256, [50, 50]),  # a burst is shared: messages of 64 or so, never fewer
        (192, 256, [64, 64, 64]),
        (1000, 256, [125] * 8),  # spread over 8 messages while each keeps 64
        (2000, 256, [250] * 8),
        (5000, 256, [250] * 20),  # as few as the most per message allows
        (5, 2, [2, 2, 1]),
        (200, 64, [50] * 4),
    ],
)
def test_a_submission_goes_out_in_messages_of_at_most_the_chunk_size(
    jobs: int, most: int, sizes: list[int]
) -> None:
    assert message_sizes(jobs, most) == sizes


def test_message_sizes_hold_every_job_once_within_the_bounds() -> None:
    for jobs in range(0, 3000, 7):
        sizes = message_sizes(jobs, defaults.CHUNK_SIZE)
        assert sum(sizes) == jobs
        assert max(sizes, default=0) - min(sizes, default=0) <= 1
        assert max(sizes, default=0) <= defaults.CHUNK_SIZE


def test_the_queue_carries_each_job_once_in_submission_order(client: Client) -> None:
    jobs = client.submit_many([f"/img/{n}.jpg" for n in range(1000)], model=IDLE)

    (queue,) = [q for q in registry.queues(client.redis, IDLE) if client.redis.llen(q)]
    raw = reversed(client.redis.lrange(queue, 0, -1))  # LPUSH: the first sent is last
    messages = [json.loads(base64.b64decode(json.loads(m)["body"]))[0][0] for m in raw]
    assert [len(m) for m in messages] == [125] * 8
    assert [i for m in messages for i in m] == [j.id for j in jobs]


def test_a_client_refuses_messages_of_no_jobs(redis_url: str) -> None:
    with pytest.raises(ValueError, match="at least one job"):
        Client.from_url(redis_url, chunk_size=0)
