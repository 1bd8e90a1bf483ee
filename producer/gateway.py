"""The HTTP gateway: the Python API over HTTP, with the same job records and error types.

Errors answer ``{"error": {"type", "message"}}`` with the ``type`` the Python API raises.
Long-polls share one subscription to the finished-jobs channel instead of one per request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contract import defaults, registry
from contract.errors import (
    AccessDenied,
    AlreadyFinal,
    IdConflict,
    InternalError,
    InvalidRequest,
    NotFound,
    ServiceError,
    TooLarge,
    as_service_error,
)
from contract.gauges import QueueCollector
from contract.job import JOB_ID_PATTERN, validate_job_id
from producer import bulk, status
from producer.api_schema import (
    BatchCancelOut,
    BatchOut,
    JobList,
    JobOut,
    ModelList,
    Submission,
    SubmitOne,
    describe_problem,
    error_responses,
)
from producer.client import Client, SubmitRequest
from producer.finished import FinishedHub

log = logging.getLogger(__name__)

# Largest request body accepted, in bytes, unless the operator says otherwise.
MAX_BODY_BYTES = 1024 * 1024
# Longest long-poll a GET may ask for, in seconds.
MAX_WAIT_S = 60.0
# Where /docs loads Swagger UI's JavaScript and CSS from: the gateway itself.
DOCS_ASSETS = "/docs/assets"
# A batch results page: its media type, and the headers that carry its cursor and completeness.
NDJSON = "application/x-ndjson"
CURSOR_HEADER = "X-Imgcls-Cursor"
COMPLETE_HEADER = "X-Imgcls-Complete"

# HTTP status for each error type; anything else is a 500.
_HTTP_STATUS = {
    InvalidRequest.type: 422,
    "unsupported_model": 422,
    NotFound.type: 404,
    AccessDenied.type: 401,
    TooLarge.type: 413,
    IdConflict.type: 409,
    AlreadyFinal.type: 409,
    "unavailable": 503,
}


@dataclass(frozen=True)
class GatewaySettings:
    redis_url: str = defaults.REDIS_URL
    token: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    chunk_size: int = defaults.CHUNK_SIZE
    # Redis instances holding the job records (contract.shards); empty: redis_url alone.
    store_urls: tuple[str, ...] = ()


# -- request size ------------------------------------------------------------------------


class BodyLimit:
    """Refuse bodies over ``max_bytes`` with 413, whether or not they declare a length."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = await self._read(scope, receive)
        if body is None:
            limit = f"the request body is larger than {self.max_bytes} bytes"
            await _error_response(TooLarge(limit))(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None as soon as it is known to be too large."""
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)


# -- errors ------------------------------------------------------------------------------


class InternalErrors:
    """Answer an unexpected exception as a 500 in the documented ``{"error": ...}`` shape.

    An ASGI middleware rather than an exception handler: Starlette re-raises after its handler,
    and the server then drops the kept-alive connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as e:
            if started or scope["type"] != "http":
                raise
            log.exception("unexpected failure answering %s", scope.get("path"))
            message = str(as_service_error(e)).encode("utf-8", "backslashreplace").decode()
            await _error_response(InternalError(message[:1000]))(scope, receive, send)


def _error_response(error: ServiceError, status_code: int | None = None) -> JSONResponse:
    code = status_code or _HTTP_STATUS.get(error.type, 500)
    headers = {"WWW-Authenticate": "Bearer"} if code == 401 else None
    return JSONResponse({"error": error.to_dict()}, status_code=code, headers=headers)


def _allowed_methods(request: Request) -> str:
    """Every method some route of the request's path takes (GET and DELETE on a job):
    Starlette's own ``Allow`` names only the first such route's."""
    path = request.url.path
    methods = {
        m
        for route in request.app.routes
        if isinstance(route, APIRoute) and route.path_regex.match(path)
        for m in route.methods or ()
    }
    return ", ".join(sorted(methods))


def _install_error_handlers(app: FastAPI) -> None:
    async def service_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return _error_response(exc)

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = exc.errors()
        message = "; ".join(describe_problem(e) for e in problems[:5])
        malformed = any(e["type"] == "json_invalid" for e in problems)
        return _error_response(InvalidRequest(message), 400 if malformed else 422)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        kind = NotFound if exc.status_code == 404 else InvalidRequest
        reply = _error_response(kind(str(exc.detail)), exc.status_code)
        reply.headers.update(exc.headers or {})
        if exc.status_code == 405:
            reply.headers["Allow"] = _allowed_methods(request)
        return reply

    async def redis_down(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            {"error": {"type": "unavailable", "message": f"Redis is unreachable: {exc}"}},
            status_code=503,
        )

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(redis.RedisError, redis_down)


# -- routes ------------------------------------------------------------------------------


async def _known_query_only(request: Request) -> None:
    """Refuse query parameters the endpoint does not take: ``?wiat=30`` would silently not wait."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    known = _query_names(dependant) if dependant is not None else set()
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        takes = ", ".join(sorted(known)) or "none"
        raise InvalidRequest(f"unknown query parameters {unknown}; this endpoint takes: {takes}")


def _query_names(dependant: Any) -> set[str]:
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


router = APIRouter(
    prefix="/v1",
    responses=error_responses(400, 413, 422, 503),
    dependencies=[Depends(_known_query_only)],
)
_bearer = HTTPBearer(auto_error=False, description="Required when the gateway has a token.")


def _client(request: Request) -> Client:
    client: Client = request.app.state.client
    return client


def _hub(request: Request) -> FinishedHub:
    hub: FinishedHub = request.app.state.hub
    return hub


ClientDep = Annotated[Client, Depends(_client)]
JobIdPath = Annotated[str, Path(max_length=defaults.MAX_JOB_ID_LEN, pattern=JOB_ID_PATTERN)]
HubDep = Annotated[FinishedHub, Depends(_hub)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]


def _token_checker(token: str) -> Callable[..., Awaitable[None]]:
    async def check(credentials: Credentials) -> None:
        given = "" if credentials is None else credentials.credentials
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise AccessDenied("a valid bearer token is required: Authorization: Bearer <token>")

    return check


@router.post(
    "/jobs", status_code=202, response_model=JobOut | JobList, responses=error_responses(409)
)
def submit(body: Submission, client: ClientDep) -> dict[str, Any]:
    """Queue one job, or many for one model; returns the records in request order.

    An ``id`` that exists already answers its record when the request (uri, model, top_k) is
    the same, and 409 ``conflict`` when it is not; then nothing of the request is queued.
    """
    deadline = None if body.deadline_s is None else time.time() + body.deadline_s
    if isinstance(body, SubmitOne):
        job = client.submit(
            body.uri,
            model=body.model,
            top_k=body.top_k,
            job_id=body.id,
            callback_url=body.callback_url,
            priority=body.priority,
            batch=body.batch,
            output=body.output,
            deadline=deadline,
            ttl_s=body.ttl_s,
        )
        return job.to_dict()
    requests = [SubmitRequest(j.uri, j.id, j.callback_url) for j in body.jobs]
    jobs = client.submit_many(
        requests,
        model=body.model,
        top_k=body.top_k,
        callback_url=body.callback_url,
        priority=body.priority,
        batch=body.batch,
        output=body.output,
        deadline=deadline,
        ttl_s=body.ttl_s,
        keep_open=body.keep_open,
    )
    return {"batch": jobs[0].batch, "jobs": [j.to_dict() for j in jobs]}


BatchIdPath = Annotated[str, Path(max_length=defaults.MAX_JOB_ID_LEN, pattern=JOB_ID_PATTERN)]


@router.delete(
    "/batches/{batch_id}", response_model=BatchCancelOut, responses=error_responses(404, 409)
)
def cancel_batch(batch_id: BatchIdPath, client: ClientDep) -> dict[str, Any]:
    """Cancel every job of the batch not final yet (queued ones never run, running ones'
    results are discarded); answers how many were cancelled and the batch afterwards. A
    finished batch answers 409 ``already_final`` and is left as it is; an unknown one 404."""
    cancelled, batch = client.cancel_batch(batch_id)
    return {"cancelled": cancelled, "batch": batch.to_dict()}


@router.post("/batches/{batch_id}/close", response_model=BatchOut, responses=error_responses(404))
def close_batch(batch_id: BatchIdPath, client: ClientDep) -> dict[str, Any]:
    """Let a batch held open (``keep_open``) finish: now if all its jobs are final, else with
    the last of them; answers the batch. Closing a closed batch changes nothing."""
    return client.close_batch(batch_id).to_dict()


@router.get("/batches/{batch_id}", response_model=BatchOut, responses=error_responses(404))
def get_batch(batch_id: BatchIdPath, client: ClientDep) -> dict[str, Any]:
    """A batch's counts by status, progress and times, summed over every store shard."""
    batch = client.batch(batch_id)
    if batch is None:
        raise NotFound(f"no batch {batch_id!r} (never submitted, or expired)")
    return batch.to_dict()


@router.delete("/jobs/{job_id}", response_model=JobOut, responses=error_responses(404, 409))
def cancel_job(job_id: JobIdPath, client: ClientDep) -> dict[str, Any]:
    """Cancel a job; answers its record, now ``cancelled``. A queued job never runs; a running
    job's result is discarded when it comes. A job that is final already (done, failed,
    cancelled, expired) answers 409 ``already_final`` and is left as it is; an unknown ID 404."""
    return client.cancel(job_id).to_dict()


@router.get("/jobs/{job_id}", response_model=JobOut, responses=error_responses(404))
async def get_job(
    job_id: JobIdPath,
    client: ClientDep,
    hub: HubDep,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S, description="Seconds to wait.")] = 0.0,
) -> dict[str, Any]:
    """A job's record; with ``wait``, once it is final or ``wait`` seconds have passed."""
    validate_job_id(job_id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    with hub.watch(job_id) as finished:
        while True:
            job = await run_in_threadpool(client.get, job_id)
            if job is None:
                raise NotFound(f"no job {job_id!r} (never submitted, or its record expired)")
            left = deadline - loop.time()
            if job.is_final or left <= 0:
                return job.to_dict()
            # Re-read at least every recheck interval, in case an announcement was missed.
            with suppress(TimeoutError):
                await asyncio.wait_for(finished.wait(), min(defaults.WAIT_RECHECK_S, left))
            finished.clear()


@router.get("/models", response_model=ModelList)
def models(client: ClientDep) -> dict[str, Any]:
    """Every registered model, with its live workers and queue depth."""
    found = []
    for state in status.snapshot(client.redis, records=client.store):
        info = registry.get_model(client.redis, state.model)
        if info is not None:
            found.append(_model_out(info, state, registry.versions(client.redis, state.model)))
    return {"models": found}


def _batch_results_router(shards: int) -> APIRouter:
    """The results route; its cursor has one position per store shard, which its pattern says."""
    batches = APIRouter(
        prefix="/v1",
        responses=error_responses(400, 413, 422, 503),
        dependencies=[Depends(_known_query_only)],
    )
    cursor_pattern = rf"^[0-9]{{1,18}}(\.[0-9]{{1,18}}){{{shards - 1}}}$"

    def batch_results(
        batch_id: BatchIdPath,
        client: ClientDep,
        cursor: str | None = None,
        limit: Annotated[
            int, Query(ge=1, le=defaults.MAX_BATCH_PAGE, description="Most records in the page.")
        ] = defaults.BATCH_PAGE,
    ) -> StreamingResponse:
        """The records of the batch's final jobs after ``cursor``, streamed as JSONL.

        Read on with the cursor the answer's header gives until it says complete. A record no
        longer in Redis (expired, or written by the results sink and expired early) is a
        ``not_found`` line naming its ID."""
        ids, after, complete = client.batch_result_ids(batch_id, cursor, limit)

        def lines() -> Iterator[bytes]:
            for chunk in client.iter_records(ids):
                yield "".join(json.dumps(bulk.record(i, j)) + "\n" for i, j in chunk).encode()

        headers = {CURSOR_HEADER: after, COMPLETE_HEADER: "true" if complete else "false"}
        return StreamingResponse(lines(), media_type=NDJSON, headers=headers)

    # Set here, not written above: a string annotation could not see cursor_pattern.
    batch_results.__annotations__["cursor"] = Annotated[
        str | None,
        Query(pattern=cursor_pattern, description="From a page's X-Imgcls-Cursor header."),
    ]
    batches.add_api_route(
        "/batches/{batch_id}/results",
        batch_results,
        methods=["GET"],
        response_class=StreamingResponse,
        responses=RESULTS_RESPONSES,
    )
    return batches


RESULTS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {NDJSON: {"schema": {"type": "string"}}},
        "description": "One job record per line (JSONL), in the order the jobs became final. "
        f"The {CURSOR_HEADER} header is the cursor that reads on; {COMPLETE_HEADER} is true "
        "once the batch is finished and nothing follows.",
        "headers": {
            CURSOR_HEADER: {"schema": {"type": "string"}},
            COMPLETE_HEADER: {"schema": {"type": "string", "enum": ["true", "false"]}},
        },
    },
    **error_responses(404),
}


def _model_out(
    info: registry.ModelInfo, state: status.ModelStatus, versions: list[str]
) -> dict[str, Any]:
    return {
        "name": info.name,
        "version": info.version,
        "versions": versions,
        "weights": info.weights,
        "random_weights": info.random_weights,
        "num_classes": info.num_classes,
        "device": info.device,
        "workers": list(state.workers),
        "queue_depth": state.queued,
        "oldest_queued_age_s": state.oldest_age_s,
    }


def _health_routes(app: FastAPI) -> None:
    @app.get("/healthz", responses=error_responses(503))
    def healthz(client: ClientDep) -> dict[str, str]:
        """200 while Redis answers; no token needed."""
        client.redis.ping()
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        """Queue depth and oldest queued age of every model, for scaling from zero workers."""
        return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)


def _docs_routes(app: FastAPI) -> None:
    """Swagger UI at /docs from the gateway itself (swagger-ui-bundle's files): no CDN, so it
    works with no internet."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
        )


# -- the app -----------------------------------------------------------------------------


def create_app(
    settings: GatewaySettings | None = None,
    client_factory: Callable[[], Client] | None = None,
) -> FastAPI:
    """The gateway app; ``client_factory`` lets tests hand in their own ``Client``."""
    settings = settings or GatewaySettings()
    factory = client_factory or (
        # A relative path means nothing relative to the gateway's directory: queued as given.
        lambda: Client.from_url(
            settings.redis_url,
            settings.store_urls,
            chunk_size=settings.chunk_size,
            absolute_paths=False,
        )
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = factory()
        app.state.client = client
        app.state.hub = FinishedHub(client.store.clients, asyncio.get_running_loop())
        app.state.metrics = CollectorRegistry()
        collector = QueueCollector(
            client.redis, lambda: registry.known_models(client.redis), client.store
        )
        app.state.metrics.register(collector)
        app.state.hub.start()
        try:
            yield
        finally:
            app.state.hub.stop()
            client.close()

    app = FastAPI(
        title="imgcls gateway",
        version="1",
        summary="Queue images for classification and read their top-k labels.",
        lifespan=lifespan,
        docs_url=None,  # served by _docs_routes, from local files
        redoc_url=None,  # ReDoc would load from a CDN
    )
    auth = [Security(_token_checker(settings.token))] if settings.token else []
    for routes in (router, _batch_results_router(max(len(settings.store_urls), 1))):
        app.include_router(
            routes, dependencies=auth, responses=error_responses(401) if auth else None
        )
    _health_routes(app)
    _docs_routes(app)
    _install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(InternalErrors)
    return app
