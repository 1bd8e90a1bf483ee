"""Wiring: set up the warm model once, register the Celery task, run a Celery worker.

The worker uses Celery's ``threads`` pool: one process per device, so CUDA is initialised in
the only process there is and never inherited across a fork.
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import ip_network

import redis
import torch
from celery import Celery, Task

from contract import defaults, keys, registry
from contract.connection import connect
from contract.errors import MalformedMessage
from contract.messaging import TASK_NAME, make_celery
from contract.registry import ModelInfo
from contract.shards import ShardedStore, connect_all
from worker.deadletter import DeadLetters, guard_step
from worker.decode import DecodePolicy, install_pixel_limit
from worker.fetch import Fetcher, FetchPolicy
from worker.inference import Classifier, pick_device, pick_dtype
from worker.metrics import Metrics
from worker.models import load_model
from worker.pipeline import Pipeline
from worker.recovery import Reaper
from worker.service import Service
from worker.settings import CLOSE_TIMEOUT_S, CPU_BATCH_SIZE, GPU_BATCH_SIZE, Settings

log = logging.getLogger(__name__)

# Times a message that failed unexpectedly (not a job's fault, not a Redis outage) is retried
# before its unfinished jobs are failed as internal errors.
MESSAGE_RETRIES = 3


@dataclass
class Runtime:
    """Everything a warm worker holds; built once by ``setup``, torn down by ``close``."""

    settings: Settings
    redis: redis.Redis
    service: Service
    pipeline: Pipeline
    io_pool: ThreadPoolExecutor
    metrics: Metrics
    dead_letters: DeadLetters
    info: ModelInfo
    host_pool: ThreadPoolExecutor | None = None

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Stop feeders before what they feed, all within ``timeout_s``: the I/O pool that
        submits to the pipeline (and the host threads), then the pipeline, then the Redis
        client both write with."""
        deadline = time.monotonic() + timeout_s
        for pool in (self.io_pool, self.host_pool):
            if pool is not None and not _shutdown_pool(pool, max(0.0, deadline - time.monotonic())):
                log.warning("loading threads still busy after %.0f s; not waiting", timeout_s)
        if not self.pipeline.close(max(0.0, deadline - time.monotonic())):
            log.warning("pipeline threads still busy after %.0f s; not waiting for them", timeout_s)
        registry.retire(self.redis, self.settings.model, self.settings.worker_id)
        self.service.store.close(keep=self.redis)
        self.redis.close()


def _shutdown_pool(pool: ThreadPoolExecutor, timeout_s: float) -> bool:
    """``pool.shutdown(wait=True)``, bounded: True if its work finished within ``timeout_s``."""
    closer = threading.Thread(target=pool.shutdown, name="io-shutdown", daemon=True)
    closer.start()
    closer.join(timeout_s)
    return not closer.is_alive()


def setup(settings: Settings) -> Runtime:
    """Load the model, warm it up and start the pipeline. Raises ``ModelLoadError`` if it can't."""
    settings.validate()
    install_pixel_limit(settings.max_pixels)
    # Denormal floats can make CPU kernels 10-100x slower; flushing them costs no accuracy that
    # matters here. Set before any thread starts, so every thread inherits it.
    torch.set_flush_denormal(True)
    device = pick_device(settings.device)
    loaded = load_model(settings)
    batch_size = settings.batch_size or (
        GPU_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE
    )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    classifier = Classifier(
        loaded,
        device,
        pick_dtype(settings.precision, device),
        channels_last=settings.channels_last,
        compile=settings.compile,
        fold_batch_norm=settings.fold_batch_norm,
        batch_size=batch_size,
        cuda_graphs=settings.cuda_graphs,
        jpeg_decoder=settings.jpeg_decoder,
    )
    started = time.perf_counter()
    classifier.warmup()
    log.info(
        "model %s (%s) warm on %s in %.1f s",
        loaded.name,
        loaded.weights_id,
        device,
        time.perf_counter() - started,
    )
    client = connect(settings.redis_url, health_check_interval=10)
    urls = settings.store_urls or (settings.redis_url,)
    store = ShardedStore(connect_all(urls, settings.redis_url, client, health_check_interval=10))
    metrics = Metrics(settings.model)
    dead_letters = DeadLetters(client, settings.worker_id)
    pipeline = Pipeline(
        classifier,
        store,
        metrics,
        max_batch=batch_size,
        max_wait_s=settings.max_wait_ms / 1000,
        store_wait_s=settings.store_wait_ms / 1000,
        inline_infer=device.type == "cpu",
    )
    io_pool = ThreadPoolExecutor(settings.io_threads, thread_name_prefix="io")
    # Local files are loaded by as many threads as the process has torch threads (the cores it
    # was given) unless told: worker.service.Service._start says why.
    host_threads = settings.host_threads or torch.get_num_threads()
    host_pool = ThreadPoolExecutor(host_threads, thread_name_prefix="host")
    info = ModelInfo(
        settings.model,
        loaded.weights_id,
        loaded.random_weights,
        len(loaded.categories),
        str(device),
    )
    service = Service(
        model=settings.model,
        worker_id=settings.worker_id,
        store=store,
        fetcher=Fetcher(_fetch_policy(settings)),
        classifier=classifier,
        pipeline=pipeline,
        metrics=metrics,
        dead_letters=dead_letters,
        io_pool=io_pool,
        io_threads=settings.io_threads,
        host_pool=host_pool,
        host_threads=host_threads,
        decode_policy=_decode_policy(settings, classifier),
        max_attempts=settings.max_attempts,
        version=info.version,
    )
    pipeline.start()
    return Runtime(
        settings, client, service, pipeline, io_pool, metrics, dead_letters, info, host_pool
    )


def _fetch_policy(settings: Settings) -> FetchPolicy:
    if settings.fetch_deadline_s >= settings.visibility_timeout_s:
        log.warning(
            "--fetch-deadline-s %g is not below --visibility-timeout %d: a slow source can "
            "outlive its message, which is then delivered (and fetched) again",
            settings.fetch_deadline_s,
            settings.visibility_timeout_s,
        )
    return FetchPolicy(
        allowed_roots=tuple(p.resolve() for p in settings.allowed_roots),
        max_bytes=settings.max_bytes,
        s3_buckets=settings.s3_buckets,
        http_allowed_networks=tuple(ip_network(n) for n in settings.http_allowed_networks),
        timeout_s=settings.fetch_timeout_s,
        deadline_s=settings.fetch_deadline_s,
        max_redirects=settings.fetch_max_redirects,
        retries=settings.fetch_retries,
        backoff_s=settings.fetch_backoff_s,
        ca_bundle=settings.ca_bundle,
    )


def _decode_policy(settings: Settings, classifier: Classifier) -> DecodePolicy:
    resize = tuple(classifier.loaded.transforms.resize_size)
    return DecodePolicy(
        max_pixels=settings.max_pixels,
        draft_min_side=2 * resize[0],
        resize_size=resize,
        max_resized_pixels=settings.max_resized_pixels,
    )


def register_task(app: Celery, service: Service) -> None:
    @app.task(
        name=TASK_NAME,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        max_retries=MESSAGE_RETRIES,
        shared=False,  # bound to this app and its service: never handed to other apps
    )
    def classify(self: Task, job_ids: list[str]) -> None:
        try:
            outcome = service.handle(job_ids)
        except MalformedMessage:
            raise  # already dead-lettered: nothing to retry
        except Exception as e:
            # Celery acks a task that raises; without this its jobs would stay running forever.
            if self.request.retries < MESSAGE_RETRIES:
                log.exception("message failed unexpectedly; retrying it")
                raise self.retry(exc=e, countdown=2**self.request.retries) from e
            service.fail_unfinished(job_ids, e)
            raise
        log.debug("message done: %s", outcome)


class Heartbeat(threading.Thread):
    """Keeps the worker's heartbeat key alive: the model is warm and jobs are being taken."""

    def __init__(self, runtime: Runtime, interval_s: float) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.runtime = runtime
        self.interval_s = interval_s
        self.stopped = threading.Event()

    def stop(self, timeout_s: float) -> None:
        self.stopped.set()
        self.join(timeout_s)
        if self.is_alive():
            log.warning("heartbeat still running after %.0f s; not waiting for it", timeout_s)

    def run(self) -> None:
        rt = self.runtime
        state = {
            "worker": rt.settings.worker_id,
            "device": rt.info.device,
            "weights": rt.info.weights,
            "version": rt.info.version,
            "started": time.time(),
        }
        ttl_s = heartbeat_ttl_s(self.interval_s)
        while not self.stopped.is_set():
            try:
                # Registered again on every beat: a Redis that lost its data knows it at once.
                registry.register_model(rt.redis, rt.info)
                registry.heartbeat(
                    rt.redis,
                    rt.settings.model,
                    rt.settings.worker_id,
                    {**state, "at": time.time()},
                    ttl_s,
                )
            except redis.RedisError as e:
                log.warning("heartbeat failed: %s", e)
            self.stopped.wait(self.interval_s)


def heartbeat_ttl_s(interval_s: float) -> int:
    """A heartbeat key outlives two missed beats (15 s for the default 5 s beat)."""
    return max(2, math.ceil(interval_s * defaults.HEARTBEAT_TTL_S / defaults.HEARTBEAT_S))


def run_worker(runtime: Runtime, heartbeat_s: float) -> int:
    """Serve until told to stop (SIGTERM: warm shutdown that finishes or requeues work)."""
    settings = runtime.settings
    registry.register_model(runtime.redis, runtime.info)
    app = make_celery(settings.redis_url, settings.visibility_timeout_s)
    register_task(app, runtime.service)
    app.steps["consumer"].add(guard_step(runtime.dead_letters))
    beat = Heartbeat(runtime, heartbeat_s)
    beat.start()
    reaper = Reaper(
        runtime.redis,
        app,
        settings.model,
        settings.worker_id,
        heartbeat_s,
        held_ttl_s=settings.visibility_timeout_s,
    )
    reaper.start()
    runtime.metrics.ready.labels(settings.model).set(1)
    worker = app.Worker(
        pool="threads",
        concurrency=settings.concurrency,
        # High first: kombu BRPOPs these in this order (queue_order_strategy "priority").
        queues=keys.queue_names(settings.model, runtime.info.version),
        hostname=f"{settings.model}@{settings.worker_id}",
        loglevel=settings.log_level,
        without_gossip=True,
        without_mingle=True,
        prefetch_multiplier=1,
        optimization="fair",
    )
    # The model, torch, Celery and all set up so far live as long as the process: frozen out of
    # the collector's sight, a full collection (every few thousand jobs) takes a few ms instead
    # of 0.2-0.3 s of CPU (README "Per-job cost").
    gc.freeze()
    try:
        worker.start()
    finally:
        runtime.metrics.ready.labels(settings.model).set(0)
        reaper.stop()
        beat.stop(CLOSE_TIMEOUT_S)
        runtime.close()
    return worker.exitcode or 0
