"""The CLI for people: bulk submit from a file, stdin or an S3 prefix, progress and summary,
JSON logs, and export of results to JSONL or CSV. Real Redis, real worker, real S3 endpoint."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import redis

from producer.client import Client
from tests.faults_support import wait_until
from tests.support import ROOT, RedisServer, WorkerProcess, producer_help, write_images
from tests.support_gateway import register_idle_model

MODEL = "mobilenet_v3_small"
IDLE = "idle-model"


@dataclass
class Served:
    redis_url: str
    worker: WorkerProcess
    images: list[str]
    missing: str


@pytest.fixture(scope="module")
def served(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory, torch_home: str
) -> Iterator[Served]:
    workdir = tmp_path_factory.mktemp("bulk")
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    images = [str(p) for p in write_images(workdir / "images", 3, width=64, height=64)]
    args = ["--weights", "none", "--device", "cpu", "--allowed-root", str(workdir)]
    worker = WorkerProcess(redis_server.url, MODEL, args, workdir, env={"TORCH_HOME": torch_home})
    worker.start()
    yield Served(redis_server.url, worker, images, str(workdir / "missing.jpg"))
    worker.stop()


def producer(
    redis_url: str, *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producer", args[0], "--redis-url", redis_url, *args[1:]],
        input=stdin,
        capture_output=True,
        text=True,
        errors="surrogateescape",  # stdin may carry bytes that are not UTF-8
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        check=False,
    )


def test_submit_from_stdin_waits_and_summarises_by_error_type(served: Served) -> None:
    uris = [*served.images, served.missing]

    run = producer(
        served.redis_url,
        "submit",
        "--model",
        MODEL,
        "--file",
        "-",
        "--wait",
        "60",
        "--ordered",
        "--progress",
        "--summary",
        stdin="\n".join(uris) + "\n",
    )

    assert run.returncode == 1, run.stderr  # one job failed
    records = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["uri"] for r in records] == uris  # input order, one JSON record per line
    assert [r["status"] for r in records] == ["done", "done", "done", "failed"]
    assert "finished" in run.stderr  # the progress bar, on stderr only
    assert "submitted 4, done 3, failed 1 (not_found 1), pending 0" in run.stderr


def test_summary_and_logs_are_json_lines_with_log_json(served: Served) -> None:
    run = producer(
        served.redis_url,
        "submit",
        "--model",
        MODEL,
        "--wait",
        "60",
        "--summary",
        "--log-json",
        "--log-level",
        "info",
        served.images[0],
        served.missing,
    )

    assert run.returncode == 1, run.stderr  # one job failed
    lines = [json.loads(line) for line in run.stderr.splitlines()]
    summary = next(line for line in lines if "img_per_s" in line and "message" not in line)
    assert summary["done"] == 1 and summary["failed_by_type"] == {"not_found": 1}
    assert summary["img_per_s"] > 0
    assert any(line.get("message", "").startswith("submitted 2 jobs") for line in lines)


def test_a_refused_submission_exits_non_zero_with_the_error_type(served: Served) -> None:
    run = producer(served.redis_url, "submit", "--model", "no-such-model", "a.jpg")
    logged = producer(served.redis_url, "submit", "--model", "no-such-model", "--log-json", "a.jpg")

    assert run.returncode == 1 and run.stdout == ""
    assert "unsupported_model" in run.stderr
    assert [json.loads(line)["error_type"] for line in logged.stderr.splitlines()] == [
        "unsupported_model"
    ]


def test_a_callback_url_is_stored_with_each_job_and_a_bad_one_refused(served: Served) -> None:
    hook = "https://me.example/hooks"
    run = producer(served.redis_url, "submit", "--model", MODEL, "--callback-url", hook, "a.jpg")
    bad = producer(served.redis_url, "submit", "--model", MODEL, "--callback-url", "me", "a.jpg")

    assert run.returncode == 0
    assert json.loads(run.stdout)["callback_url"] == hook
    assert bad.returncode == 1 and bad.stdout == ""
    assert "callback_url" in bad.stderr


def test_a_name_that_is_not_utf8_is_refused_in_one_line_and_nothing_is_queued(
    served: Served, tmp_path: Path
) -> None:
    register_idle_model(served.redis_url, IDLE)
    listing = tmp_path / "latin1.txt"
    listing.write_bytes(b"caf\xe9.jpg\n")
    argument = os.fsdecode(b"caf\xe9.jpg")  # a Latin-1 file name given on the command line

    runs = [
        producer(served.redis_url, "submit", "--model", IDLE, "--file", str(listing)),
        producer(served.redis_url, "submit", "--model", IDLE, argument),
        producer(served.redis_url, "submit", "--model", IDLE, "-", stdin=argument + "\n"),
    ]

    for run in runs:
        assert run.returncode == 1 and run.stdout == ""
        assert "invalid_request" in run.stderr and "not valid UTF-8" in run.stderr
        assert "Traceback" not in run.stderr
    assert redis.Redis.from_url(served.redis_url).llen(f"imgcls.{IDLE}") == 0


def test_submit_from_stdin_queues_each_write_batch_before_the_input_ends(served: Served) -> None:
    register_idle_model(served.redis_url, IDLE)
    cmd = [sys.executable, "-m", "producer", "submit", "--redis-url", served.redis_url]
    cmd += ["--model", IDLE, "--batch", "streamed", "--no-progress", "-"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, env=env, text=True)
    assert proc.stdin is not None
    client = Client.from_url(served.redis_url)
    try:
        proc.stdin.write("".join(f"/x/{i}.jpg\n" for i in range(2001)))  # one write batch, and one
        proc.stdin.flush()
        wait_until(lambda: (b := client.batch("streamed")) is not None and b.total == 2000, "2000")
        held = client.batch("streamed")
        assert held is not None and held.pending == 2000 and not held.is_finished
        proc.stdin.write("/x/last.jpg\n")
        proc.stdin.close()
        assert proc.wait(timeout=120) == 0
        batch = client.batch("streamed")
        assert batch is not None and batch.total == 2002
    finally:
        if proc.poll() is None:
            proc.kill()
        client.close()


def test_submit_from_an_s3_prefix_queues_every_object_under_it(
    served: Served, s3_client, aws_env: dict[str, str]
) -> None:
    register_idle_model(served.redis_url, IDLE)
    s3_client.create_bucket(Bucket="photos")
    wanted = [f"cats/{i:04d}.jpg" for i in range(5)]
    for key in [*wanted, "dogs/0.jpg", "cats/sub/"]:
        s3_client.put_object(Bucket="photos", Key=key, Body=b"x")

    run = producer(
        served.redis_url,
        "submit",
        "--model",
        IDLE,
        "--s3-prefix",
        "s3://photos/cats/",
        "--summary",
        env=aws_env,
    )

    assert run.returncode == 0, run.stderr
    uris = [json.loads(line)["uri"] for line in run.stdout.splitlines()]
    assert uris == [f"s3://photos/{k}" for k in wanted]
    assert "submitted 5" in run.stderr


def test_an_s3_prefix_that_cannot_be_listed_is_reported(
    served: Served, aws_env: dict[str, str]
) -> None:
    register_idle_model(served.redis_url, IDLE)

    run = producer(
        served.redis_url, "submit", "--model", IDLE, "--s3-prefix", "s3://no-bucket/", env=aws_env
    )

    assert run.returncode == 1
    assert "not_found" in run.stderr and "no-bucket" in run.stderr


def test_export_writes_jsonl_and_csv_from_submit_output(served: Served, tmp_path: Path) -> None:
    submitted = producer(
        served.redis_url, "submit", "--model", MODEL, "--wait", "60", *served.images[:2]
    )
    assert submitted.returncode == 0, submitted.stderr  # every job done
    submitted_file = tmp_path / "submitted.jsonl"
    submitted_file.write_text(submitted.stdout)
    records = [json.loads(line) for line in submitted.stdout.splitlines()]

    jsonl = producer(served.redis_url, "export", "--file", str(submitted_file))
    as_csv = producer(
        served.redis_url, "export", "--format", "csv", "--file", "-", stdin=submitted.stdout
    )
    with_unknown = producer(served.redis_url, "export", records[0]["id"], "never-submitted")

    assert [json.loads(line) for line in jsonl.stdout.splitlines()] == records
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    top = records[0]["predictions"][0]
    assert rows[0]["label"] == top["label"]
    assert float(rows[0]["probability"]) == pytest.approx(top["probability"])
    assert json.loads(rows[0]["predictions"]) == records[0]["predictions"]
    assert len(with_unknown.stdout.splitlines()) == 1
    assert "exported 1 records (1 unknown or expired)" in with_unknown.stderr


def test_export_all_writes_every_record_and_failures_carry_their_error(
    served: Served, tmp_path: Path
) -> None:
    producer(served.redis_url, "submit", "--model", MODEL, "--wait", "60", served.missing)
    out = tmp_path / "all.csv"

    run = producer(served.redis_url, "export", "--all", "--format", "csv", "-o", str(out))

    rows = list(csv.DictReader(out.open()))
    total = sum(1 for _ in redis.Redis.from_url(served.redis_url).scan_iter("imgcls:job:*"))
    assert run.returncode == 0 and len(rows) == total
    failed = [r for r in rows if r["uri"] == served.missing]
    assert failed and failed[0]["error_type"] == "not_found" and failed[0]["label"] == ""


@pytest.mark.parametrize("command", ["submit", "result", "export", "status", "serve"])
def test_every_option_is_explained_in_help(command: str) -> None:
    from producer.cli import main

    text = producer_help(command)

    for param in main.commands[command].params:
        if isinstance(param, click.Option):
            assert param.help, f"{command} {param.opts[0]} has no help text"
            assert param.opts[0] in text
