"""Scale-out on one Redis: each model's jobs go to that model's pool and nowhere else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from contract import defaults, registry
from contract.errors import InvalidRequest, UnsupportedModel
from producer.cli import main as producer_cli
from producer.client import Client
from tests.faults_support import TinyNet, tiny_model_args
from tests.support import write_images
from tests.support_gateway import register_idle_model

MODEL_A = "mobilenet_v3_small"
MODEL_B = "squeezenet1_1"
TINY = "tiny"
WORKER_ARGS = ("--weights", "none", "--device", "cpu", "--concurrency", "2")


def test_each_models_jobs_run_only_on_that_models_workers(
    redis_url: str, start_worker, tmp_path: Path
) -> None:
    images = [str(p) for p in write_images(tmp_path / "images", 12, width=64, height=64)]
    # Model B is declared (as if its pool were scaled to zero) before any B worker exists.
    register_idle_model(redis_url, MODEL_B)
    pool_a = [start_worker(MODEL_A, *WORKER_ARGS, wait=False) for _ in range(2)]
    for worker in pool_a:
        worker.wait_ready(120)
    client = Client.from_url(redis_url, chunk_size=2)
    try:
        jobs_b = client.submit_many(images, model=MODEL_B)
        jobs_a = client.submit_many(images, model=MODEL_A)
        finished_a = client.wait_many([j.id for j in jobs_a], 120)
        # Every A job is done; B's jobs sat beside them on the same Redis, untouched.
        untouched_b = client.get_many([j.id for j in jobs_b])
        queued_b = registry.queue_depth(client.redis, MODEL_B)

        worker_b = start_worker(MODEL_B, *WORKER_ARGS)
        finished_b = client.wait_many([j.id for j in jobs_b], 120)
    finally:
        client.close()

    ids_a = {w.worker_id for w in pool_a}
    assert [j.status for j in finished_a] == ["done"] * len(images)
    assert {j.worker for j in finished_a} <= ids_a
    assert [(j.status, j.attempts, j.worker) for j in untouched_b] == [("queued", 0, None)] * 12
    assert queued_b == len(images) // 2  # two jobs per message
    assert [j.status for j in finished_b] == ["done"] * len(images)
    assert {j.worker for j in finished_b} == {worker_b.worker_id}
    assert {j.model for j in finished_b} == {MODEL_B}
    assert {j.version for j in finished_b} == {registry.model_version("none", 1000)}


# -- model versions and priorities ------------------------------------------------------------


def _tiny_args(directory: Path, num_classes: int, images: Path) -> list[str]:
    """TinyNet worker flags, with ``num_classes`` outputs and labels (another version of it)."""
    args = tiny_model_args(directory)
    torch.manual_seed(1)
    net = TinyNet()
    net.fc = nn.Linear(3, num_classes)
    torch.jit.save(torch.jit.script(net.eval()), str(directory / "tiny.pt"))
    (directory / "labels.txt").write_text("\n".join(f"c{i}" for i in range(num_classes)))
    return [*args, "--allowed-root", str(images)]


def _models_cli(redis_url: str, *args: str) -> list[dict]:
    result = CliRunner().invoke(producer_cli, ["models", *args, "--redis-url", redis_url])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.output.splitlines()]


def test_two_versions_of_one_model_name_each_get_only_their_own_jobs(
    redis_url: str, start_worker, tmp_path: Path
) -> None:
    images = [str(p) for p in write_images(tmp_path / "images", 8, width=48, height=48)]
    ten = start_worker(TINY, *_tiny_args(tmp_path / "ten", 10, tmp_path / "images"))
    three = start_worker(TINY, *_tiny_args(tmp_path / "three", 3, tmp_path / "images"))
    client = Client.from_url(redis_url, chunk_size=2)
    try:
        versions = {i.num_classes: i.version for i in registry.model_versions(client.redis, TINY)}
        newest = client.check_model(TINY, 1).version  # no declaration yet: the newest
        declared = _models_cli(redis_url, "declare", TINY, "--default-version", versions[10])
        unpinned = client.wait_many([j.id for j in client.submit_many(images, model=TINY)], 60)
        pinned_ref = f"{TINY}@{versions[3]}"
        pinned = client.submit_many(images, model=pinned_ref, top_k=3, priority="high")
        pinned = client.wait_many([j.id for j in pinned], 60)
        with pytest.raises(InvalidRequest, match="top_k must be an integer from 1 to 3"):
            client.submit(images[0], model=pinned_ref, top_k=5)
        with pytest.raises(UnsupportedModel, match="has no version 'nope'"):
            client.submit(images[0], model=f"{TINY}@nope")
        listed = _models_cli(redis_url, "list")
    finally:
        client.close()

    assert len(versions) == 2 and newest == versions[3]
    assert declared[0]["version"] == versions[10] and declared[0]["num_classes"] == 10
    assert {(j.status, j.worker, j.version, j.top_k) for j in unpinned} == {
        ("done", ten.worker_id, versions[10], defaults.TOP_K)
    }
    assert {(j.status, j.worker, j.version, j.priority) for j in pinned} == {
        ("done", three.worker_id, versions[3], "high")
    }
    assert all(len(j.predictions) == 3 for j in pinned)
    assert sorted((m["version"], m["default"]) for m in listed) == sorted(
        [(versions[10], True), (versions[3], False)]
    )


def test_a_high_priority_job_overtakes_a_backlog_of_low_ones(
    redis_url: str, start_worker, tmp_path: Path
) -> None:
    images = [str(p) for p in write_images(tmp_path / "images", 16, width=48, height=48)]
    args = [*_tiny_args(tmp_path / "m", 10, tmp_path / "images"), "--concurrency", "1"]
    # A worker registers the version, then stops: the backlog builds up with none running.
    start_worker(TINY, *args).stop()
    client = Client.from_url(redis_url, chunk_size=8)
    try:
        backlog = [j.id for j in client.submit_many(images * 40, model=TINY, priority="low")]
        urgent = client.submit(images[0], model=TINY, priority="high")
        start_worker(TINY, *args)
        finished = client.wait_many([*backlog, urgent.id], 120)
    finally:
        client.close()

    *low, high = finished
    assert [j.status for j in finished] == ["done"] * len(finished)
    overtaken = sum(j.finished <= high.finished for j in low)
    # Served high first: at most the message the worker may already hold, not the backlog.
    assert overtaken <= 2 * 8 < len(backlog)
