"""The results sink: a batch that names an output gets every finished record written there as
JSONL parts, at least once, by ``python -m sink run`` (killed and restarted here), to a local
directory under the sink's root or an S3 prefix (moto's server on loopback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from contract import keys
from contract.job import ErrorInfo, Job, Prediction
from producer.client import Client
from sink.outputs import LocalTarget, OutputRefused, Policy, S3Target, read_records, target
from sink.service import Sink, SinkSettings
from tests.faults_support import MODEL, SETTLE_S, model_args_fixture, wait_until  # noqa: F401
from tests.support import ROOT, write_images
from tests.support_gateway import register_idle_model
from tests.support_services import SinkProcess

IDLE = "sinknet"


@pytest.fixture
def client(redis_url: str) -> Iterator[Client]:
    register_idle_model(redis_url, IDLE)
    c = Client.from_url(redis_url)
    yield c
    c.close()


def finish(client: Client, job_ids: list[str]) -> None:
    """What a worker does: claim, then store each result (every 7th fails)."""
    now = time.time()
    for claim in client.store.claim_many(job_ids, IDLE, now, "w1", fresh_only=False):
        assert claim.job is not None
        job = claim.job
        if int(job.uri.split("/")[-1].split(".")[0]) % 7 == 0:
            final = job.failed(ErrorInfo("not_found", "gone"), now)
        else:
            final = job.done([Prediction("a", 0, 1.0)], "w", False, now)
        client.store.finish_many([final])


def _count_every_job(client: Client, where: Any, ids: list[str]) -> list[dict[str, Any]]:
    records = list(read_records(where))
    assert Counter(r["id"] for r in records) == Counter(ids)  # each once, none missing
    for record in records:
        job = client.get(record["id"])
        assert job is None or record == job.to_dict()  # what Redis held, unchanged
    return records


def _run_across_a_kill(client: Client, redis_url: str, output: str, where: Any, **kw: Any) -> None:
    """300 jobs finished in rounds while the sink runs, killed with SIGKILL once it has written
    a part, then restarted: every record reaches the output."""
    jobs = client.submit_many([f"/x/{i}.jpg" for i in range(300)], model=IDLE, output=output)
    ids = [j.id for j in jobs]
    batch = jobs[0].batch
    assert batch is not None
    sink = SinkProcess(redis_url, "--part-records", "16", "--record-ttl-s", "600", **kw).start()
    try:
        finish(client, ids[:150])
        wait_until(lambda: len(list(where.parts())) > 0, "a first part")
        sink.kill()
        finish(client, ids[150:])  # while no sink runs: their events wait in the stream
        sink.start()
        wait_until(lambda: len({r["id"] for r in read_records(where)}) == 300, "every record")
        assert sink.stop() == 0
    finally:
        if sink.proc and sink.proc.poll() is None:
            sink.kill()
    records = _count_every_job(client, where, ids)
    assert Counter(r["status"] for r in records) == {"done": 257, "failed": 43}
    state = client.batch(batch)
    assert state is not None and state.output == output and state.output_error is None
    assert state.output_written >= 300 and state.is_finished
    pending = client.redis.xpending(keys.events_stream(), "sink")
    assert pending["pending"] == 0
    ttls = [client.redis.ttl(keys.job_key(i)) for i in ids]
    assert all(0 < t <= 600 for t in ttls)  # expire sooner once written


def test_a_local_output_gets_every_record_across_a_killed_sink(
    client: Client, redis_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    where = LocalTarget((root / "results" / "run1").resolve())
    _run_across_a_kill(
        client, redis_url, "results/run1", where, env={"IMGCLS_SINK_ROOT": str(root)}
    )
    assert not [p for p in where.directory.iterdir() if p.name.endswith(".tmp")]


def test_an_s3_output_gets_every_record_across_a_killed_sink(
    client: Client, redis_url: str, s3_client: Any, aws_env: dict[str, str]
) -> None:
    s3_client.create_bucket(Bucket="results")
    where = S3Target("results", "batches/one/", s3_client)
    _run_across_a_kill(
        client,
        redis_url,
        "s3://results/batches/one/",
        where,
        env={**aws_env, "IMGCLS_SINK_S3_BUCKETS": "results other"},
    )


def _finish_in_one_call(client: Client, job_ids: list[str]) -> None:
    """One store call for all of them: one events entry."""
    now = time.time()
    claims = client.store.claim_many(job_ids, IDLE, now, "w1", fresh_only=False)
    client.store.finish_many(
        [c.job.done([Prediction("a", 0, 1.0)], "w", False, now) for c in claims if c.job]
    )


def _batch_in_entries(client: Client, jobs: int, per_entry: int) -> list[Job]:
    """A batch of ``jobs`` with an output, finished ``per_entry`` jobs a store call: one events
    entry each."""
    batch = client.submit_many([f"/x/{i}.jpg" for i in range(1, jobs + 1)], model=IDLE, output="o")
    for at in range(0, jobs, per_entry):
        _finish_in_one_call(client, [j.id for j in batch[at : at + per_entry]])
    return batch


def test_an_entry_of_more_jobs_than_a_part_holds_is_written_as_several_parts(
    client: Client, redis_client: redis.Redis, tmp_path: Path
) -> None:
    jobs = _batch_in_entries(client, 25, 25)
    sink = Sink(redis_client, SinkSettings(Policy(root=tmp_path), part_records=10))
    sink.setup()
    assert sorted(_drained_parts(sink, client, tmp_path, jobs)) == [5, 10, 10]


def test_a_step_takes_entries_up_to_part_records_jobs_and_leaves_the_rest_pending(
    client: Client, redis_client: redis.Redis, tmp_path: Path
) -> None:
    jobs = _batch_in_entries(client, 24, 8)  # three entries of eight jobs
    sink = Sink(redis_client, SinkSettings(Policy(root=tmp_path), part_records=10))
    sink.setup()
    assert sink.step() == 1  # a second entry would make 16 jobs
    # the other two, and the batch's own finish entry, wait for the next steps
    assert redis_client.xpending(keys.events_stream(), "sink")["pending"] == 3
    assert _drained_parts(sink, client, tmp_path, jobs) == [8, 8, 8]


def test_a_backlogged_sink_reads_about_one_part_of_entries_a_step(
    client: Client, redis_client: redis.Redis, tmp_path: Path
) -> None:
    jobs = _batch_in_entries(client, 160, 8)  # twenty entries of eight jobs
    sink = Sink(redis_client, SinkSettings(Policy(root=tmp_path), part_records=20))
    sink.setup()
    real, read = sink.events.read, []

    def counted(start: str, count: int, block_ms: int | None) -> Any:
        entries = real(start, count, block_ms)
        read.append(len(entries))
        return entries

    sink.events.read = counted  # type: ignore[method-assign]
    assert _drained_parts(sink, client, tmp_path, jobs) == [16] * 10
    # the first read knows no entry's size (20 of the 21 come: the batch's own entry is last),
    # each later one asks for 20/8 -> 3
    entries = [n for n in read if n]
    assert entries[0] == 20 and max(entries[1:]) == 3, read
    assert sum(entries) < 20 + 3 * 12  # before: each step read the whole backlog again (~111)


def _drained_parts(sink: Sink, client: Client, tmp_path: Path, jobs: list[Job]) -> list[int]:
    """Steps ``sink`` until no event waits; the records of each part it wrote, after checking
    that every job was written once and no event is left pending."""
    while sink.step():
        pass
    parts = sorted((tmp_path / "o").iterdir())
    _count_every_job(client, LocalTarget(tmp_path / "o"), [j.id for j in jobs])
    assert sink.redis.xpending(keys.events_stream(), "sink")["pending"] == 0
    return [len(p.read_text().splitlines()) for p in parts]


def test_a_part_written_but_not_acknowledged_is_written_again_under_its_name(
    client: Client, redis_client: redis.Redis, tmp_path: Path
) -> None:
    jobs = client.submit_many([f"/x/{i}.jpg" for i in range(1, 40)], model=IDLE, output="o")
    finish(client, [j.id for j in jobs])
    settings = SinkSettings(Policy(root=tmp_path), part_records=10)
    first = Sink(redis_client, settings)
    first.setup()
    real = redis.client.Pipeline.execute
    calls = {"n": 0}

    def dies_once(pipe: Any, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += any(c[0][0] == "XACK" for c in pipe.command_stack)
        if calls["n"] == 2:  # the second part is written; its acknowledgement never happens
            calls["n"] += 1
            raise redis.ConnectionError("killed")
        return real(pipe, *args, **kwargs)

    redis.client.Pipeline.execute = dies_once  # type: ignore[method-assign]
    try:
        first.step()
        with pytest.raises(redis.ConnectionError):
            first.step()
    finally:
        redis.client.Pipeline.execute = real  # type: ignore[method-assign]
    parts_before = sorted(p.name for p in (tmp_path / "o").iterdir())
    restarted = Sink(redis_client, settings)
    while restarted.step():
        pass
    parts_after = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert set(parts_before) <= set(parts_after) and len(parts_after) == 4  # replaced, not added
    _count_every_job(client, LocalTarget(tmp_path / "o"), [j.id for j in jobs])


@pytest.mark.parametrize(
    "output", ["../escape", "/etc/imgcls", "a/../../escape", "link/inside", "file:///tmp/x"]
)
def test_a_directory_outside_the_root_is_refused(tmp_path: Path, output: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(OutputRefused):
        target(output, Policy(root=root))
    with pytest.raises(OutputRefused):
        target("inside", Policy(root=None))


def test_buckets_off_the_allow_list_are_refused() -> None:
    policy = Policy(buckets=frozenset({"mine"}))
    assert isinstance(target("s3://mine/p", policy), S3Target)
    assert target("s3://mine/p", policy).prefix == "p/"  # type: ignore[attr-defined]
    for output in ("s3://theirs/p/", "s3:///p/"):
        with pytest.raises(OutputRefused):
            target(output, policy)


def test_a_refused_output_is_told_on_the_batch_and_its_events_are_dropped(
    client: Client, redis_client: redis.Redis, tmp_path: Path
) -> None:
    jobs = client.submit_many(["/x/1.jpg", "/x/2.jpg"], model=IDLE, output="../out")
    other = client.submit_many(["/x/3.jpg", "/x/4.jpg"], model=IDLE)  # no output: skipped
    finish(client, [j.id for j in jobs + other])
    sink = Sink(redis_client, SinkSettings(Policy(root=tmp_path)))
    sink.setup()
    assert sink.step() == 6  # 4 jobs, 2 batches finished
    state = client.batch(jobs[0].batch or "")
    assert state is not None and "outside the sink's root" in (state.output_error or "")
    assert redis_client.xpending(keys.events_stream(), "sink")["pending"] == 0
    assert list(tmp_path.iterdir()) == []


def test_a_real_worker_s_batch_reaches_the_output_and_python_m_sink_read_counts_it(
    start_worker: Any,
    model_args: list[str],
    images: list[Path],
    redis_url: str,
    tmp_path: Path,
) -> None:
    start_worker(MODEL, *model_args)
    producer = Client.from_url(redis_url)
    sink = SinkProcess(redis_url, "--root", str(tmp_path / "sinkroot")).start()
    try:
        uris = [str(p) for p in images] + [str(images[0].parent / "missing.jpg")]
        jobs = producer.submit_many(uris, model=MODEL, batch="real", output="real")
        records = producer.wait_many([j.id for j in jobs], SETTLE_S)
        wait_until(lambda: (producer.batch("real").output_written or 0) >= len(jobs), "sink")  # type: ignore[union-attr]
        assert sink.stop() == 0
    finally:
        if sink.proc and sink.proc.poll() is None:
            sink.kill()
        producer.close()
    read = subprocess.run(
        [sys.executable, "-m", "sink", "read", "--root", str(tmp_path / "sinkroot"), "real"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    written = {json.loads(line)["id"]: json.loads(line) for line in read.stdout.splitlines()}
    assert written == {r.id: r.to_dict() for r in records if r is not None}
    assert Counter(r["status"] for r in written.values()) == {"done": 20, "failed": 1}


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    return write_images(tmp_path / "images", 20, width=48, height=48)


def test_a_failed_write_leaves_the_events_pending_until_it_succeeds(
    client: Client, redis_client: redis.Redis, s3_client: Any
) -> None:
    jobs = client.submit_many(["/x/1.jpg", "/x/2.jpg"], model=IDLE, output="s3://later/p/")
    finish(client, [j.id for j in jobs])
    now = [0.0]
    sink = Sink(redis_client, SinkSettings(Policy()), s3=s3_client, clock=lambda: now[0])
    sink.setup()
    assert sink.step() == 3  # no such bucket yet: nothing acknowledged
    assert redis_client.xpending(keys.events_stream(), "sink")["pending"] == 2
    s3_client.create_bucket(Bucket="later")
    assert sink.step() == 0  # the retry waits a little
    now[0] += 10
    assert sink.step() == 2
    assert redis_client.xpending(keys.events_stream(), "sink")["pending"] == 0
    _count_every_job(client, S3Target("later", "p/", s3_client), [j.id for j in jobs])
    state = client.batch(jobs[0].batch or "")
    assert state is not None and state.output_written == 2 and state.output_error is None
