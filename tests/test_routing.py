"""Scale-out on one Redis: each model's jobs go to that model's pool and nowhere else."""

from __future__ import annotations

from pathlib import Path

from contract import keys, registry
from producer.client import Client
from tests.support import write_images
from tests.support_gateway import register_idle_model

MODEL_A = "mobilenet_v3_small"
MODEL_B = "squeezenet1_1"
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
    assert keys.queue_name(MODEL_A) != keys.queue_name(MODEL_B)
