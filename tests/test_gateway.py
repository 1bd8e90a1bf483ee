"""The HTTP gateway over real HTTP: a real redis-server, a real worker, a real uvicorn."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from contract import keys, record, registry
from contract.errors import InvalidRequest, UnsupportedModel
from contract.job import ErrorInfo, Job, validate_job_id, validate_uri
from contract.store import JobStore
from producer.api_schema import JOB_ID_PATTERN, URI_PATTERN
from producer.client import Client
from tests.support import RedisServer, WorkerProcess, free_port, write_images
from tests.support_gateway import GatewayProcess, register_idle_model

MODEL = "mobilenet_v3_small"
IDLE = "idle-model"
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Stack:
    redis_url: str
    http: httpx.Client
    worker: WorkerProcess
    images: list[Path]
    workdir: Path

    def client(self) -> Client:
        return Client.from_url(self.redis_url)


@pytest.fixture(scope="module")
def stack(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory, torch_home: str
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("gateway")
    flush = redis.Redis.from_url(redis_server.url)
    flush.flushall()
    flush.close()
    images = write_images(workdir / "images", 3, width=96, height=80)
    args = ["--weights", "none", "--device", "cpu", "--allowed-root", str(workdir)]
    worker = WorkerProcess(
        redis_server.url, MODEL, args, workdir, env={"TORCH_HOME": torch_home}
    ).start(wait=False)
    register_idle_model(redis_server.url, IDLE)
    gateway = GatewayProcess(redis_server.url, workdir, token=TOKEN).start()
    http = httpx.Client(base_url=gateway.url, headers=AUTH, timeout=60)
    try:
        worker.wait_ready(120)
        yield Stack(redis_server.url, http, worker, images, workdir)
    finally:
        http.close()
        gateway.stop()
        worker.stop()


def test_one_job_long_polls_to_the_same_record_the_python_api_reads(stack: Stack) -> None:
    uri = str(stack.images[0])
    posted = stack.http.post("/v1/jobs", json={"uri": uri, "model": MODEL, "top_k": 3})
    assert posted.status_code == 202
    queued = posted.json()
    assert queued["uri"] == uri and queued["status"] in ("queued", "running", "done")

    got = stack.http.get(f"/v1/jobs/{queued['id']}", params={"wait": 30})

    assert got.status_code == 200
    record = got.json()
    assert record["status"] == "done"
    assert record["worker"] == stack.worker.worker_id
    assert [p["index"] for p in record["predictions"]] != [] and len(record["predictions"]) == 3
    client = stack.client()
    try:
        assert client.get(queued["id"]).to_dict() == record
    finally:
        client.close()


def test_many_jobs_keep_request_order_and_failures_carry_the_python_error_contract(
    stack: Stack,
) -> None:
    jobs = [{"uri": str(p), "id": f"many-{i}"} for i, p in enumerate(stack.images)]
    jobs.append({"uri": str(stack.workdir / "no-such.jpg"), "id": "many-missing"})

    posted = stack.http.post("/v1/jobs", json={"jobs": jobs, "model": MODEL})

    assert posted.status_code == 202
    assert [j["id"] for j in posted.json()["jobs"]] == [j["id"] for j in jobs]
    finals = [stack.http.get(f"/v1/jobs/{j['id']}", params={"wait": 30}).json() for j in jobs]
    assert [f["status"] for f in finals] == ["done", "done", "done", "failed"]
    client = stack.client()
    try:
        via_python = client.wait_many([j["id"] for j in jobs], 30)
    finally:
        client.close()
    assert [j.to_dict() for j in via_python] == finals
    assert finals[-1]["error"]["type"] == "not_found"


def test_resubmitting_an_id_returns_the_existing_record_or_409_for_another_request(
    stack: Stack,
) -> None:
    body = {"uri": str(stack.images[1]), "id": "same-id", "model": MODEL}
    first = stack.http.post("/v1/jobs", json=body).json()
    stack.http.get("/v1/jobs/same-id", params={"wait": 30})

    again = stack.http.post("/v1/jobs", json=body)
    other = stack.http.post("/v1/jobs", json={**body, "uri": str(stack.images[2])})
    other_k = stack.http.post("/v1/jobs", json={**body, "top_k": 2})

    assert again.status_code == 202
    assert again.json()["uri"] == first["uri"] and again.json()["status"] == "done"
    for refused in (other, other_k):
        assert refused.status_code == 409
        assert refused.json()["error"]["type"] == "conflict"
        assert "same-id" in refused.json()["error"]["message"]


def test_a_conflicting_id_refuses_the_whole_batch(stack: Stack) -> None:
    held = stack.http.post("/v1/jobs", json={"uri": "held.jpg", "id": "held", "model": IDLE})
    queue = keys.queue_name(IDLE, held.json()["version"])
    before = redis.Redis.from_url(stack.redis_url).llen(queue)
    jobs = [{"uri": "fresh.jpg", "id": "fresh"}, {"uri": "other.jpg", "id": "held"}]

    reply = stack.http.post("/v1/jobs", json={"jobs": jobs, "model": IDLE})

    assert reply.status_code == 409 and reply.json()["error"]["type"] == "conflict"
    assert stack.http.get("/v1/jobs/fresh").status_code == 404
    assert redis.Redis.from_url(stack.redis_url).llen(queue) == before


def test_a_relative_path_is_queued_as_given_over_http(stack: Stack) -> None:
    reply = stack.http.post("/v1/jobs", json={"uri": "rel/a.jpg", "model": IDLE})

    assert reply.json()["uri"] == "rel/a.jpg"


def test_long_poll_returns_the_record_once_the_job_finishes(stack: Stack) -> None:
    posted = stack.http.post("/v1/jobs", json={"uri": "never-run.jpg", "model": IDLE}).json()
    client = redis.Redis.from_url(stack.redis_url)
    client.config_resetstat()
    replies: list[httpx.Response] = []
    url = f"/v1/jobs/{posted['id']}"
    poll = threading.Thread(target=lambda: replies.append(stack.http.get(url, params={"wait": 60})))
    poll.start()
    _wait_for_reads(client, 1)  # the poll has seen the job queued
    store = JobStore(client)
    job = store.get(posted["id"])
    assert job is not None and job.status == "queued"
    store.finish_many([job.failed(ErrorInfo("internal", "finished by the test"), 1.0)])
    poll.join(timeout=60)
    client.close()

    assert replies and replies[0].status_code == 200
    assert replies[0].json()["error"] == {"type": "internal", "message": "finished by the test"}


def test_a_long_poll_answers_once_the_job_is_cancelled(stack: Stack) -> None:
    posted = stack.http.post("/v1/jobs", json={"uri": "never-run.jpg", "model": IDLE}).json()
    client = redis.Redis.from_url(stack.redis_url)
    client.config_resetstat()
    replies: list[httpx.Response] = []
    url = f"/v1/jobs/{posted['id']}"
    poll = threading.Thread(target=lambda: replies.append(stack.http.get(url, params={"wait": 60})))
    poll.start()
    _wait_for_reads(client, 1)  # the poll has seen the job queued
    cancelled = stack.http.delete(url)
    poll.join(timeout=60)
    client.close()

    assert replies and replies[0].status_code == 200
    assert replies[0].json() == cancelled.json()
    assert replies[0].json()["status"] == "cancelled"


def _reads(client: redis.Redis) -> int:
    # Records are read with one MGET (contract.store.JobStore.get_many).
    return int(client.info("commandstats").get("cmdstat_mget", {}).get("calls", 0))


def _wait_for_reads(client: redis.Redis, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _reads(client) < count:
        assert time.monotonic() < deadline, "the gateway never read the job"
        time.sleep(0.01)


def test_long_poll_reads_the_record_about_once_a_second_not_in_a_loop(stack: Stack) -> None:
    posted = stack.http.post("/v1/jobs", json={"uri": "never-run.jpg", "model": IDLE}).json()
    client = redis.Redis.from_url(stack.redis_url)
    try:
        client.config_resetstat()
        got = stack.http.get(f"/v1/jobs/{posted['id']}", params={"wait": 2})
        reads = _reads(client)
    finally:
        client.close()

    assert got.status_code == 200 and got.json()["status"] == "queued"
    assert 2 <= reads <= 10


def test_models_lists_live_workers_and_queue_depth(stack: Stack) -> None:
    for _ in range(2):
        stack.http.post("/v1/jobs", json={"uri": "queued.jpg", "model": IDLE})

    models = {m["name"]: m for m in stack.http.get("/v1/models").json()["models"]}

    assert stack.worker.worker_id in models[MODEL]["workers"]
    assert models[IDLE]["workers"] == []
    depth = registry.queue_depth(redis.Redis.from_url(stack.redis_url), IDLE)
    assert models[IDLE]["queue_depth"] == depth >= 2
    assert models[IDLE]["oldest_queued_age_s"] >= 0


def test_without_or_with_a_wrong_token_requests_are_refused(stack: Stack) -> None:
    url = str(stack.http.base_url).rstrip("/")
    missing = httpx.get(f"{url}/v1/models")
    wrong = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"})

    for reply in (missing, wrong):
        assert reply.status_code == 401
        assert reply.json()["error"]["type"] == "access_denied"
        assert reply.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{url}/healthz").status_code == 200


def test_unknown_model_gives_the_same_error_type_as_the_python_api(stack: Stack) -> None:
    reply = stack.http.post("/v1/jobs", json={"uri": "a.jpg", "model": "no-such-model"})

    client = stack.client()
    try:
        with pytest.raises(UnsupportedModel) as raised:
            client.submit("a.jpg", model="no-such-model")
    finally:
        client.close()
    assert reply.status_code == 422
    assert reply.json()["error"]["type"] == raised.value.type == "unsupported_model"


@pytest.mark.parametrize(
    "body",
    [
        {"uri": "a.jpg", "id": "has space", "model": MODEL},
        {"uri": "ftp://host/a.jpg", "model": MODEL},
        {"uri": "a.jpg", "model": MODEL, "top_k": 0},
        {"jobs": [], "model": MODEL},
        {"uri": "a.jpg", "unknown_field": 1},
        [1, 2],
    ],
)
def test_invalid_requests_are_422_invalid_request_and_queue_nothing(
    stack: Stack, body: object
) -> None:
    before = registry.queue_depth(redis.Redis.from_url(stack.redis_url), MODEL)

    reply = stack.http.post("/v1/jobs", json=body)

    assert reply.status_code == 422
    assert reply.json()["error"]["type"] == InvalidRequest.type
    assert registry.queue_depth(redis.Redis.from_url(stack.redis_url), MODEL) == before


@pytest.mark.parametrize(
    ("field", "body"),
    [
        ("top_k", {"uri": "a.jpg", "model": IDLE, "top_k": True}),
        ("top_k", {"uri": "a.jpg", "model": IDLE, "top_k": "5"}),
        ("top_k", {"uri": "a.jpg", "model": IDLE, "top_k": 5.0}),
        ("top_k", {"jobs": [{"uri": "a.jpg"}], "model": IDLE, "top_k": 1e3}),
        ("uri", {"uri": 5, "model": IDLE}),
        ("id", {"uri": "a.jpg", "id": 7, "model": IDLE}),
    ],
)
def test_json_of_the_wrong_type_is_refused_naming_the_field_not_converted(
    stack: Stack, field: str, body: dict[str, object]
) -> None:
    reply = stack.http.post("/v1/jobs", json=body)

    assert reply.status_code == 422
    assert reply.json()["error"]["type"] == InvalidRequest.type
    assert field in reply.json()["error"]["message"]


def test_a_uri_that_is_not_utf8_is_refused(stack: Stack) -> None:
    body = b'{"uri": "caf\\udce9.jpg", "model": "' + IDLE.encode() + b'"}'

    reply = stack.http.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})

    assert reply.status_code == 422
    assert reply.json()["error"]["type"] == InvalidRequest.type
    assert "uri" in reply.json()["error"]["message"]


def test_an_unexpected_failure_is_a_500_in_the_error_shape(stack: Stack) -> None:
    """A record stored before URIs were checked for UTF-8 cannot be written out as JSON."""
    job = Job("old-latin1", os.fsdecode(b"caf\xe9.jpg"), IDLE, 1)  # a Latin-1 file name's bytes
    value = record.encode(job, record.Catalog())
    redis.Redis.from_url(stack.redis_url).set(keys.job_key("old-latin1"), value)

    reply = stack.http.get("/v1/jobs/old-latin1")

    assert reply.status_code == 500
    assert reply.headers["content-type"] == "application/json"
    assert reply.json()["error"]["type"] == "internal"


def test_one_bad_uri_refuses_the_whole_batch(stack: Stack) -> None:
    jobs = [{"uri": "fine.jpg", "id": "batch-ok"}, {"uri": "ftp://x/y.jpg", "id": "batch-bad"}]

    reply = stack.http.post("/v1/jobs", json={"jobs": jobs, "model": IDLE})

    assert reply.status_code == 422
    assert stack.http.get("/v1/jobs/batch-ok").status_code == 404


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"uri": "a.jpg", "id": "has space"}, "id: must be 1 to 128 characters of letters"),
        ({"jobs": [{"uri": "a.jpg", "id": "-x"}]}, "jobs.0.id: must be 1 to 128 characters"),
        ({"uri": "a.jpg", "model": "bad model"}, "model: must be 1 to 100 characters"),
        ({"uri": "a.jpg", "top_k": 0}, "top_k: must be an integer from 1 to 1000"),
        ({"jobs": []}, "jobs: must list 1 to 10000 jobs"),
        ({"uri": "a.jpg", "ttl_s": 0}, "ttl_s: must be an integer from 1 to 2592000 seconds"),
        ({"uri": "a.jpg", "deadline_s": 0}, "deadline_s: must be a number of seconds above 0"),
    ],
)
def test_validation_errors_name_the_field_and_the_rule_in_words(
    stack: Stack, body: dict[str, object], expected: str
) -> None:
    reply = stack.http.post("/v1/jobs", json=body)

    message = reply.json()["error"]["message"]
    assert reply.status_code == 422
    assert message.startswith(expected)
    assert "^" not in message and "pattern" not in message


def test_docs_load_swagger_ui_from_the_gateway_itself(stack: Stack) -> None:
    page = stack.http.get("/docs")

    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    assert assets and all(a.startswith("/docs/assets/") for a in assets)
    loaded = [stack.http.get(a) for a in assets]
    assert all(r.status_code == 200 and r.content for r in loaded)
    assert any(a.endswith(".js") for a in assets) and any(a.endswith(".css") for a in assets)


def test_malformed_json_is_400(stack: Stack) -> None:
    reply = stack.http.post(
        "/v1/jobs", content=b'{"uri": ', headers={"Content-Type": "application/json"}
    )

    assert reply.status_code == 400
    assert reply.json()["error"]["type"] == "invalid_request"


def test_an_unknown_query_parameter_is_refused_rather_than_ignored(stack: Stack) -> None:
    reply = stack.http.get("/v1/jobs/some-job", params={"wiat": 30})

    assert reply.status_code == 422
    assert "wiat" in reply.json()["error"]["message"]


def test_unknown_job_is_404_and_a_bad_id_422(stack: Stack) -> None:
    unknown = stack.http.get("/v1/jobs/never-submitted")
    bad = stack.http.get("/v1/jobs/-bad")

    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found"
    assert bad.status_code == 422 and bad.json()["error"]["type"] == "invalid_request"


def test_bodies_over_the_limit_are_413_with_or_without_a_length(stack: Stack) -> None:
    big = b'{"uri": "' + b"a" * (2 * 1024 * 1024) + b'"}'
    headers = {"Content-Type": "application/json"}

    declared = stack.http.post("/v1/jobs", content=big, headers=headers)
    chunked = stack.http.post("/v1/jobs", content=iter([big[:1000], big[1000:]]), headers=headers)

    for reply in (declared, chunked):
        assert reply.status_code == 413
        assert reply.json()["error"]["type"] == "too_large"


def test_delete_cancels_a_queued_job_then_answers_409_and_404(stack: Stack) -> None:
    body = {"uri": "c.jpg", "id": "to-cancel", "model": IDLE, "ttl_s": 120, "deadline_s": 600}
    before = time.time()
    queued = stack.http.post("/v1/jobs", json=body).json()

    cancelled = stack.http.delete("/v1/jobs/to-cancel")
    again = stack.http.delete("/v1/jobs/to-cancel")
    unknown = stack.http.delete("/v1/jobs/never-was")

    assert queued["ttl_s"] == 120 and before + 600 <= queued["deadline"] <= time.time() + 600
    assert cancelled.status_code == 200
    assert cancelled.json() == {**queued, "status": "cancelled", "finished": ANY_NUMBER}
    assert stack.http.get("/v1/jobs/to-cancel").json() == cancelled.json()
    assert again.status_code == 409
    assert again.json()["error"]["type"] == "already_final"
    assert "already cancelled" in again.json()["error"]["message"]
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found"
    assert 0 < redis.Redis.from_url(stack.redis_url).ttl(keys.job_key("to-cancel")) <= 120


def test_delete_of_a_done_job_is_409_and_leaves_it_done(stack: Stack) -> None:
    body = {"uri": str(stack.images[0]), "id": "done-then-cancel", "model": MODEL}
    stack.http.post("/v1/jobs", json=body)
    done = stack.http.get("/v1/jobs/done-then-cancel", params={"wait": 30}).json()

    refused = stack.http.delete("/v1/jobs/done-then-cancel")

    assert done["status"] == "done"
    assert refused.status_code == 409 and refused.json()["error"]["type"] == "already_final"
    assert stack.http.get("/v1/jobs/done-then-cancel").json() == done


class _AnyNumber:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, int | float)


ANY_NUMBER = _AnyNumber()


def test_openapi_schema_describes_the_endpoints(stack: Stack) -> None:
    schema = stack.http.get("/openapi.json").json()

    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/models"} <= set(schema["paths"])
    assert "409" in schema["paths"]["/v1/jobs"]["post"]["responses"]
    assert {"404", "409"} <= set(schema["paths"]["/v1/jobs/{job_id}"]["delete"]["responses"])
    statuses = schema["components"]["schemas"]["JobStatus"]["enum"]
    assert {"cancelled", "expired"} <= set(statuses)
    assert schema["components"]["schemas"]["JobOut"]["properties"]["status"] == {
        "$ref": "#/components/schemas/JobStatus",
        "description": "queued -> running -> done | failed; or cancelled, or expired (deadline)",
    }
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


def test_redis_down_is_503_unavailable(tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    gateway = GatewayProcess(dead, tmp_path).start()
    try:
        posted = httpx.post(f"{gateway.url}/v1/jobs", json={"uri": "a.jpg"}, timeout=30)
        got = httpx.get(f"{gateway.url}/v1/jobs/some-id", timeout=30)
        health = httpx.get(f"{gateway.url}/healthz", timeout=30)
    finally:
        gateway.stop()

    for reply in (posted, got, health):
        assert reply.status_code == 503
        assert reply.json()["error"]["type"] == "unavailable"


def _accepts(validate: Callable[[str], str], value: str) -> bool:
    try:
        validate(value)
    except InvalidRequest:
        return False
    return True


_URI_CHARS = st.sampled_from(list("aZs3:/ \t\n\x00.+-hftpie\x1c\u00a0x"))
_ID_CHARS = st.sampled_from(list("aZ09._:-/ \n\x00é"))


@settings(max_examples=3000, deadline=None)
@given(uri=st.text(_URI_CHARS, max_size=12) | st.text(max_size=12))
def test_the_schema_uri_pattern_accepts_exactly_what_the_contract_accepts(uri: str) -> None:
    assert (re.match(URI_PATTERN, uri) is not None) == _accepts(validate_uri, uri)


@settings(max_examples=1000, deadline=None)
@given(job_id=st.text(_ID_CHARS, min_size=1, max_size=8))
def test_every_job_id_the_schema_allows_is_accepted_by_the_contract(job_id: str) -> None:
    # Only this direction: contract.job's `$` also lets a trailing newline through ("a\n"),
    # which the schema rightly refuses.
    if re.fullmatch(JOB_ID_PATTERN, job_id):
        assert _accepts(validate_job_id, job_id)


def test_a_callback_url_is_kept_per_job_or_for_every_job_of_a_request(stack: Stack) -> None:
    one = {"uri": "a.jpg", "model": IDLE, "callback_url": "https://me.example/one"}
    many = {
        "jobs": [{"uri": "b.jpg", "callback_url": "https://me.example/own"}, {"uri": "c.jpg"}],
        "model": IDLE,
        "callback_url": "https://me.example/all",
    }
    got_one = stack.http.post("/v1/jobs", json=one).json()
    got_many = stack.http.post("/v1/jobs", json=many).json()["jobs"]
    assert got_one["callback_url"] == "https://me.example/one"
    assert [j["callback_url"] for j in got_many] == [
        "https://me.example/own",
        "https://me.example/all",
    ]


@pytest.mark.parametrize("url", ["ftp://me.example/", "me.example/hook", "http://a b/"])
def test_a_callback_url_that_is_not_http_is_refused_naming_the_field(
    stack: Stack, url: str
) -> None:
    reply = stack.http.post("/v1/jobs", json={"uri": "a.jpg", "model": IDLE, "callback_url": url})
    assert reply.status_code == 422
    assert "callback_url" in reply.json()["error"]["message"]


def test_a_bulk_submission_is_a_batch_whose_results_stream_from_a_cursor(stack: Stack) -> None:
    bad = str(stack.workdir / "missing.jpg")
    jobs = [{"uri": str(p)} for p in stack.images] * 2 + [{"uri": bad}]
    reply = stack.http.post("/v1/jobs", json={"jobs": jobs, "model": MODEL, "top_k": 2})
    assert reply.status_code == 202, reply.text
    batch = reply.json()["batch"]
    ids = [j["id"] for j in reply.json()["jobs"]]
    assert batch and {j["batch"] for j in reply.json()["jobs"]} == {batch}
    seen: list[dict] = []
    cursor = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = stack.http.get(f"/v1/batches/{batch}/results", params=params)
        assert page.status_code == 200 and page.headers["content-type"] == "application/x-ndjson"
        seen += [json.loads(line) for line in page.text.splitlines()]
        cursor = page.headers["X-Imgcls-Cursor"]
        if page.headers["X-Imgcls-Complete"] == "true":
            break
        time.sleep(0.2)
    assert sorted(r["id"] for r in seen) == sorted(ids)  # every job once
    assert {r["status"] for r in seen if r["id"] != ids[-1]} == {"done"}
    status = stack.http.get(f"/v1/batches/{batch}").json()
    assert status["counts"] == {"done": 6, "failed": 1, "cancelled": 0, "expired": 0}
    assert (status["total"], status["pending"], status["progress"]) == (7, 0, 1.0)
    assert status["finished"] >= status["created"]
    one = stack.http.post("/v1/jobs", json={"uri": bad, "model": MODEL, "batch": batch})
    assert one.json()["batch"] == batch
    assert stack.http.get(f"/v1/batches/{batch}").json()["total"] == 8
    assert stack.http.get("/v1/batches/nobody").status_code == 404
    assert stack.http.get("/v1/batches/nobody/results").status_code == 404
    foreign = stack.http.get(f"/v1/batches/{batch}/results", params={"cursor": "1.2"})
    assert foreign.status_code == 422 and "cursor" in foreign.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"uri": "/x.jpg", "batch": "../etc"}, "batch"),
        ({"uri": "/x.jpg", "output": "http://example.com/x"}, "output"),
        ({"jobs": [{"uri": "/x.jpg"}], "output": "s3://b/\x01"}, "output"),
        ({"jobs": [{"uri": "/x.jpg"}], "keep_open": "yes"}, "keep_open"),
    ],
)
def test_a_bad_batch_or_output_is_refused_naming_the_field(
    stack: Stack, body: dict, field: str
) -> None:
    reply = stack.http.post("/v1/jobs", json={**body, "model": IDLE})
    assert reply.status_code == 422
    assert reply.json()["error"]["message"].startswith(f"{field}: ")


def test_a_batch_kept_open_across_requests_finishes_once_closed(stack: Stack) -> None:
    jobs = [{"uri": str(p)} for p in stack.images]
    body = {"jobs": jobs, "model": MODEL, "batch": "g-open", "keep_open": True}
    reply = stack.http.post("/v1/jobs", json=body)
    assert reply.status_code == 202, reply.text
    ids = [j["id"] for j in reply.json()["jobs"]]
    deadline = time.monotonic() + 120
    while any(stack.http.get(f"/v1/jobs/{i}").json()["status"] != "done" for i in ids):
        assert time.monotonic() < deadline, "the jobs did not finish"
        time.sleep(0.2)
    assert stack.http.get("/v1/batches/g-open").json()["finished"] is None  # more may come
    closed = stack.http.post("/v1/batches/g-open/close")
    assert closed.status_code == 200, closed.text
    assert closed.json()["finished"] is not None and closed.json()["counts"]["done"] == len(ids)
    assert stack.http.post("/v1/batches/nobody/close").status_code == 404
    one = {"jobs": jobs[:1], "model": IDLE, "keep_open": True}  # one job, no batch named
    held = stack.http.post("/v1/jobs", json=one).json()["batch"]
    assert held is not None  # a batch is generated for it to hold
    assert stack.http.post(f"/v1/batches/{held}/close").json()["pending"] == 1


def test_delete_cancels_a_batch_once(stack: Stack) -> None:
    jobs = [{"uri": str(p)} for p in stack.images]
    reply = stack.http.post("/v1/jobs", json={"jobs": jobs, "model": IDLE})  # no worker takes
    batch = reply.json()["batch"]
    gone = stack.http.delete(f"/v1/batches/{batch}")
    assert gone.status_code == 200, gone.text
    assert gone.json()["cancelled"] == len(jobs)
    assert gone.json()["batch"]["counts"]["cancelled"] == len(jobs)
    assert gone.json()["batch"]["finished"] is not None
    again = stack.http.delete(f"/v1/batches/{batch}")
    assert again.status_code == 409 and again.json()["error"]["type"] == "already_final"
    assert stack.http.delete("/v1/batches/nobody").status_code == 404
    for job in reply.json()["jobs"]:
        assert stack.http.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
