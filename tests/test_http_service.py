"""The service as a client written in another language sees it: HTTP and S3 only.

It submits a batch with a callback URL and an S3 output to the gateway, receives every signed
webhook (its receiver fails each first delivery), cancels a second batch, and reads the first
batch's results both from the gateway and, as any S3 client would, from the bucket the results
sink wrote. Every process is real (worker, gateway, webhook sender, sink) and every server
listens on 127.0.0.1 (Redis, the gateway, moto's S3, the receiver).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.faults_support import MODEL, model_args_fixture, wait_until  # noqa: F401
from tests.support import write_images
from tests.support_gateway import GatewayProcess, register_idle_model
from tests.support_services import Receiver, Sender, SinkProcess

# A model no worker serves: its batch stays queued until it is cancelled.
IDLE = "httpidle"
BUCKET = "results"


@pytest.fixture
def gateway(redis_url: str, tmp_path: Path) -> Iterator[GatewayProcess]:
    process = GatewayProcess(redis_url, tmp_path).start()
    yield process
    process.stop()


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    return write_images(tmp_path / "images", 12, width=48, height=48)


def _s3_records(s3_client: Any) -> list[dict[str, Any]]:
    """Every JSONL line under the batch's prefix, as plain S3 reads give them (duplicates kept)."""
    listed = s3_client.list_objects_v2(Bucket=BUCKET, Prefix="photos/").get("Contents", [])
    bodies = [s3_client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listed]
    return [json.loads(line) for body in bodies for line in body.splitlines() if line.strip()]


def _submit(http: httpx.Client, uris: list[str], **fields: Any) -> list[str]:
    answer = http.post("/v1/jobs", json={"jobs": [{"uri": u} for u in uris], **fields})
    assert answer.status_code == 202, answer.text
    return [job["id"] for job in answer.json()["jobs"]]


def test_a_client_speaking_only_http_gets_signed_webhooks_cancels_and_reads_s3(
    start_worker: Any,
    model_args: list[str],
    images: list[Path],
    gateway: GatewayProcess,
    redis_url: str,
    tmp_path: Path,
    s3_client: Any,
    aws_env: dict[str, str],
) -> None:
    register_idle_model(redis_url, IDLE)
    s3_client.create_bucket(Bucket=BUCKET)
    uris = [str(p) for p in images]
    missing = str(images[0].parent / "missing.jpg")  # fails, and is reported as such
    start_worker(MODEL, *model_args)
    sender, sink = Sender(redis_url), SinkProcess(redis_url, "--s3-bucket", BUCKET, env=aws_env)
    with Receiver(fail_first=1) as receiver, httpx.Client(base_url=gateway.url) as http:
        sender.start()
        sink.start()
        try:
            photos = _submit(
                http,
                [*uris, missing],
                model=MODEL,
                top_k=3,
                batch="photos",
                callback_url=receiver.url,
                output=f"s3://{BUCKET}/photos/",
            )
            later = _submit(http, uris[:5], model=IDLE, batch="later", callback_url=receiver.url)
            cancelled = http.delete("/v1/batches/later")
            assert cancelled.status_code == 200 and cancelled.json()["cancelled"] == 5
            again = http.delete("/v1/batches/later")
            assert again.status_code == 409
            assert again.json()["error"]["type"] == "already_final"

            wanted = {f"{i}:done" for i in photos[:-1]} | {f"{photos[-1]}:failed"}
            wanted |= {f"{i}:cancelled" for i in later}
            wanted |= {"photos/batch:finished", "later/batch:finished"}
            wait_until(lambda: receiver.delivered().keys() >= wanted, "every webhook")
            wait_until(lambda: len({r["id"] for r in _s3_records(s3_client)}) == 13, "S3 parts")
            batch = http.get("/v1/batches/photos").json()
            page = http.get("/v1/batches/photos/results", params={"limit": 100})
        finally:
            assert sender.stop() == 0 and sink.stop() == 0

    assert receiver.delivered().keys() == wanted  # nothing else was sent
    assert {p.verified for p in receiver.posts} == {True}
    assert Counter(p.answered for p in receiver.posts)[500] == len(wanted)  # each retried once
    assert batch["counts"] == {"done": 12, "failed": 1, "cancelled": 0, "expired": 0}
    assert batch["pending"] == 0 and batch["finished"] is not None
    assert page.headers["X-Imgcls-Complete"] == "true"
    from_gateway = {r["id"]: r for r in map(json.loads, page.text.splitlines())}
    assert from_gateway.keys() == set(photos)
    from_s3 = {r["id"]: r for r in _s3_records(s3_client)}
    assert from_s3 == from_gateway  # the sink wrote what Redis held, each record unchanged
    assert from_s3[photos[-1]]["error"]["type"] == "not_found"
    for webhook_id, body in receiver.delivered().items():
        job_id = webhook_id.split(":")[0]
        if job_id in from_gateway:
            assert json.loads(body) == from_gateway[job_id]
