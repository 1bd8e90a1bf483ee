"""``python -m worker``: every option a flag, each with an environment-variable fallback."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from contract import defaults, redis_errors
from contract.logs import configure_logging
from contract.shards import parse_urls
from worker import settings as worker_defaults
from worker.settings import Preprocess, Settings

log = logging.getLogger("worker")

# Every flag's default comes from worker.settings: the one home of the worker's defaults.
_PREPROCESS = Preprocess()


def _floats(text: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in text.split(","))
    if len(values) != 3:
        raise click.BadParameter("give three comma-separated numbers, one per RGB channel")
    return values  # type: ignore[return-value]


def _csv(values: tuple[float, ...]) -> str:
    return ",".join(str(v) for v in values)


def _show_envvars(command: click.Command) -> click.Command:
    """Make every option's ``--help`` line name its environment variable."""
    for param in command.params:
        if isinstance(param, click.Option):
            param.show_envvar = True
    return command


@_show_envvars
@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option(
    "--model",
    envvar="IMGCLS_MODEL",
    required=True,
    help="torchvision classification model name (resnet50, efficientnet_b0, ...), or "
    "the name to serve a --model-file under. Names the queue this worker takes.",
)
@click.option(
    "--weights",
    envvar="IMGCLS_WEIGHTS",
    default=worker_defaults.WEIGHTS,
    help="DEFAULT (torchvision's pretrained weights, from TORCH_HOME or downloaded), a "
    "weights name such as IMAGENET1K_V1, 'none' for random weights, or a state-dict "
    "file path or s3:// URI (loaded with weights_only=True).",
)
@click.option(
    "--model-file",
    envvar="IMGCLS_MODEL_FILE",
    type=click.Path(path_type=Path),
    help="Serve a TorchScript file (torch.jit.save) instead of a torchvision model.",
)
@click.option(
    "--labels",
    envvar="IMGCLS_LABELS",
    type=click.Path(path_type=Path),
    help="Text file with one label per line (default: ImageNet-1k categories).",
)
@click.option(
    "--resize",
    envvar="IMGCLS_RESIZE",
    default=_PREPROCESS.resize,
    help="TorchScript models: resize the shorter side to this.",
)
@click.option(
    "--crop",
    envvar="IMGCLS_CROP",
    default=_PREPROCESS.crop,
    help="TorchScript models: center-crop to this square.",
)
@click.option(
    "--mean",
    envvar="IMGCLS_MEAN",
    default=_csv(_PREPROCESS.mean),
    help="TorchScript models: normalise mean.",
)
@click.option(
    "--std",
    envvar="IMGCLS_STD",
    default=_csv(_PREPROCESS.std),
    help="TorchScript models: normalise std.",
)
@click.option(
    "--device",
    envvar="IMGCLS_DEVICE",
    default=worker_defaults.DEVICE,
    help="auto, cpu, cuda or cuda:N. One worker process per GPU.",
)
@click.option(
    "--precision",
    envvar="IMGCLS_PRECISION",
    default=worker_defaults.PRECISION,
    type=click.Choice(worker_defaults.PRECISIONS),
    help="auto is fp16 on a GPU and fp32 on a CPU.",
)
@click.option(
    "--channels-last/--no-channels-last",
    envvar="IMGCLS_CHANNELS_LAST",
    default=Settings.channels_last,
    help="NHWC memory layout.",
)
@click.option(
    "--fold-batch-norm/--no-fold-batch-norm",
    envvar="IMGCLS_FOLD_BATCH_NORM",
    default=Settings.fold_batch_norm,
    help="On a CPU, fold each batch norm that follows a convolution into its weights "
    "(torch.fx): one pass over the activations less, the same probabilities to about 1e-6.",
)
@click.option(
    "--compile/--no-compile",
    "compile_",
    envvar="IMGCLS_COMPILE",
    default=Settings.compile,
    help="torch.compile the model at startup (slower start, faster batches).",
)
@click.option(
    "--cuda-graphs/--no-cuda-graphs",
    envvar="IMGCLS_CUDA_GRAPHS",
    default=True,
    help="On CUDA, replay the forward pass as a graph captured at start-up (not with --compile).",
)
@click.option(
    "--jpeg-decoder",
    type=click.Choice(worker_defaults.JPEG_DECODERS),
    envvar="IMGCLS_JPEG_DECODER",
    default=Settings.jpeg_decoder,
    show_default=True,
    help="On CUDA, who decodes JPEGs: torchvision's nvJPEG (Huffman decoding on the CPU) or "
    "nvImageCodec (the GPU's hardware JPEG engines; pip install 'imgcls[nvimgcodec]').",
)
@click.option(
    "--redis-url",
    envvar="REDIS_URL",
    default=defaults.REDIS_URL,
    help="Broker and job store; rediss://, unix://, redis+sentinel://host:port,…/service[/db].",
)
@click.option(
    "--store-url",
    "store_urls",
    envvar="IMGCLS_STORE_URLS",
    multiple=True,
    help="Redis holding a shard of the job records (repeatable, or comma-separated in the "
    "environment); every worker and producer needs the same list in the same order "
    "[default: --redis-url].",
)
@click.option(
    "--batch-size",
    envvar="IMGCLS_BATCH_SIZE",
    type=int,
    help="Most jobs per forward pass [default: "
    f"{worker_defaults.GPU_BATCH_SIZE} on a GPU, {worker_defaults.CPU_BATCH_SIZE} on a CPU].",
)
@click.option(
    "--max-wait-ms",
    envvar="IMGCLS_MAX_WAIT_MS",
    default=worker_defaults.MAX_WAIT_MS,
    help="Longest wait for a batch to fill before it runs anyway.",
)
@click.option(
    "--store-wait-ms",
    envvar="IMGCLS_STORE_WAIT_MS",
    default=worker_defaults.STORE_WAIT_MS,
    help="Longest wait, while more jobs are in flight, for more results to store in the same "
    "Redis call as the first (a lone job is stored at once). Longer: fewer calls, less Redis CPU "
    "a job under load; shorter: results visible sooner.",
)
@click.option(
    "--io-threads",
    envvar="IMGCLS_IO_THREADS",
    default=worker_defaults.IO_THREADS,
    help="Threads fetching and decoding images from S3 and http(s) while the device computes.",
)
@click.option(
    "--host-threads",
    envvar="IMGCLS_HOST_THREADS",
    type=int,
    help="Threads loading local files [default: the process's torch threads, one per core it "
    "has]; more where local paths are a network file system that can stall.",
)
@click.option(
    "--concurrency",
    envvar="IMGCLS_CONCURRENCY",
    type=int,
    help="Queue messages handled at once [default: "
    f"{worker_defaults.GPU_CONCURRENCY} on a GPU, {worker_defaults.CPU_CONCURRENCY} on a CPU].",
)
@click.option(
    "--allowed-root",
    "allowed_roots",
    envvar="IMGCLS_ALLOWED_ROOTS",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Directory local paths must lie under (repeatable; the environment variable "
    "takes a list separated by the OS path separator) [default: current directory].",
)
@click.option(
    "--max-bytes",
    envvar="IMGCLS_MAX_BYTES",
    default=worker_defaults.MAX_BYTES,
    help="Largest source accepted, in bytes.",
)
@click.option(
    "--max-pixels",
    envvar="IMGCLS_MAX_PIXELS",
    default=worker_defaults.MAX_PIXELS,
    help="Largest image accepted, in pixels (decompression-bomb guard; cannot be off).",
)
@click.option(
    "--max-resized-pixels",
    envvar="IMGCLS_MAX_RESIZED_PIXELS",
    default=worker_defaults.MAX_RESIZED_PIXELS,
    help="Most pixels the model's resize may make of one image (refuses very thin images "
    "from their header, before decoding).",
)
@click.option(
    "--fetch-deadline-s",
    envvar="IMGCLS_FETCH_DEADLINE_S",
    default=worker_defaults.FETCH_DEADLINE_S,
    help="Longest one fetch may take in all, retries and slow bodies included; a source "
    "that takes longer fails as deadline_exceeded. Keep it below --visibility-timeout.",
)
@click.option(
    "--fetch-timeout-s",
    envvar="IMGCLS_FETCH_TIMEOUT_S",
    default=worker_defaults.FETCH_TIMEOUT_S,
    help="Connect and per-read timeout of one S3 or http(s) request.",
)
@click.option(
    "--fetch-retries",
    envvar="IMGCLS_FETCH_RETRIES",
    default=worker_defaults.FETCH_RETRIES,
    help="Retries of a transient fetch failure (throttling, 5xx, timeouts).",
)
@click.option(
    "--fetch-backoff-s",
    envvar="IMGCLS_FETCH_BACKOFF_S",
    default=worker_defaults.FETCH_BACKOFF_S,
    help="Base of the exponential backoff (full jitter) between fetch retries.",
)
@click.option(
    "--fetch-max-redirects",
    envvar="IMGCLS_FETCH_MAX_REDIRECTS",
    default=worker_defaults.FETCH_MAX_REDIRECTS,
    help="Redirects followed per http(s) fetch, each checked again.",
)
@click.option(
    "--ca-bundle",
    envvar="IMGCLS_CA_BUNDLE",
    type=click.Path(path_type=Path),
    help="PEM file of CA certificates for https sources (e.g. a private CA) "
    "[default: certifi's bundle].",
)
@click.option(
    "--s3-bucket",
    "s3_buckets",
    envvar="IMGCLS_S3_BUCKETS",
    multiple=True,
    help="Allow only these S3 buckets (repeatable) [default: any].",
)
@click.option(
    "--http-allow-network",
    "http_networks",
    envvar="IMGCLS_HTTP_ALLOW_NETWORKS",
    multiple=True,
    help="CIDR exempt from the refusal of private, loopback and "
    "link-local addresses for http(s) URIs (repeatable).",
)
@click.option(
    "--visibility-timeout",
    envvar="IMGCLS_VISIBILITY_TIMEOUT",
    default=defaults.VISIBILITY_TIMEOUT_S,
    help="Seconds before a message taken by a worker that died goes back to the queue.",
)
@click.option(
    "--max-attempts",
    envvar="IMGCLS_MAX_ATTEMPTS",
    default=defaults.MAX_ATTEMPTS,
    help="Deliveries of a job before it fails as a poison pill.",
)
@click.option(
    "--heartbeat-s",
    envvar="IMGCLS_HEARTBEAT_S",
    type=click.FloatRange(min=0.1),
    default=float(defaults.HEARTBEAT_S),
    help="Seconds between heartbeats. A worker whose heartbeat is missed for three of them "
    "is dead: its messages go back to the queue, and the model is registered again on "
    "every beat.",
)
@click.option(
    "--metrics-port",
    envvar="IMGCLS_METRICS_PORT",
    default=worker_defaults.METRICS_PORT,
    help="Serve /metrics (Prometheus), /healthz (liveness) and /readyz (model warm and "
    "consuming) on this port; 0 turns them off.",
)
@click.option(
    "--metrics-host",
    envvar="IMGCLS_METRICS_HOST",
    default=worker_defaults.METRICS_HOST,
    help="Address the metrics and health endpoint listens on.",
)
@click.option(
    "--processes",
    envvar="IMGCLS_PROCESSES",
    default=worker_defaults.PROCESSES,
    callback=lambda _ctx, _param, value: _processes(value),
    help="Worker processes on this host, each a complete worker: auto is one single-threaded "
    "process per core on a CPU and --processes-per-gpu per GPU on a GPU host; 1 serves in "
    "this process.",
)
@click.option(
    "--processes-per-gpu",
    envvar="IMGCLS_PROCESSES_PER_GPU",
    type=click.IntRange(min=1),
    default=worker_defaults.PROCESSES_PER_GPU,
    help="With --processes auto on a GPU host: worker processes per GPU.",
)
@click.option(
    "--worker-id",
    envvar="IMGCLS_WORKER_ID",
    help="[default: HOSTNAME-PID; with several processes, each gets -0, -1, ...]",
)
@click.option("--log-level", envvar="IMGCLS_LOG_LEVEL", default=worker_defaults.LOG_LEVEL)
@click.option(
    "--log-json/--no-log-json",
    envvar="IMGCLS_LOG_JSON",
    default=Settings.log_json,
    help="Log JSON lines instead of text.",
)
def main(**opts: object) -> None:
    """Serve one classification model from its own queue, with the model warm in memory.

    Exit status: 0 after a clean shutdown; 2 for a bad option or a model that cannot be
    loaded; 3 when Redis is unreachable at start-up; 4 when Redis refuses the password;
    70 when the device broke.
    """
    os.environ.update(cpu_thread_env(os.environ))  # before torch is imported
    settings = _settings(opts)
    # Celery logs every message at INFO; at thousands of images a second that drowns the rest.
    quiet = ("celery.worker.strategy", "celery.app.trace")
    configure_logging(settings.log_level, settings.log_json, quiet)
    from worker.app import run_worker, setup
    from worker.health import HealthServer
    from worker.models import ModelLoadError

    for url in (settings.redis_url, *settings.store_urls):
        _check_redis(url)  # before the model: a wrong password fails in a second
    _supervise_if_several(opts, settings)
    # Up before the model loads: live but not ready while it warms.
    port = settings.metrics_port
    health = HealthServer(settings.metrics_host, port).start() if port else None
    try:
        runtime = setup(settings)
    except (ModelLoadError, ValueError) as e:
        log.critical("worker not started: %s", e)
        sys.exit(2)
    try:
        if health is not None:
            health.attach(runtime)
        code = run_worker(runtime, heartbeat_s=settings.heartbeat_s)
    finally:
        if health is not None:
            health.close()  # last: /readyz says "shutting down" until the drain is over
    sys.exit(code)


def cpu_thread_env(environ: Mapping[str, str]) -> dict[str, str]:
    """What to add to the environment before torch loads OpenMP: threads that sleep between
    parallel regions instead of spinning, unless the operator chose otherwise."""
    if "OMP_WAIT_POLICY" in environ:
        return {}
    return {"OMP_WAIT_POLICY": worker_defaults.OMP_WAIT_POLICY}


def _check_redis(url: str) -> None:
    """Exit with one line (password masked) if Redis is unreachable or refuses our password."""
    try:
        redis_errors.check(url)
    except redis_errors.REDIS_ERRORS as e:
        code, line = redis_errors.describe(e, url)
        log.critical("worker not started: %s", line)
        sys.exit(code)


def _processes(value: str) -> int | None:
    from worker.supervisor import parse_processes

    try:
        return parse_processes(value)
    except ValueError as e:
        raise click.BadParameter("give auto or a count >= 1") from e


def _supervise_if_several(opts: dict[str, Any], settings: Settings) -> None:
    """With more than one process planned, run them as children and exit with their status."""
    from worker import supervisor

    if opts["processes"] == 1:
        return
    device = settings.device
    cores = supervisor.cpu_count()
    gpus = supervisor.gpu_count(device)
    devices = supervisor.plan_devices(
        opts["processes"], device, opts["processes_per_gpu"], gpus, cores
    )
    if len(devices) == 1:
        return
    try:
        settings.validate()  # once here, not once per child
    except ValueError as e:
        log.critical("worker not started: %s", e)
        sys.exit(2)
    ready = supervisor.heartbeat_ready(settings.redis_url, settings.model)
    sys.exit(
        supervisor.serve(sys.argv[1:], devices, settings.worker_id, settings.metrics_port, ready)
    )


def _settings(o: dict[str, Any]) -> Settings:
    roots = _roots(o["allowed_roots"])
    extra = {"worker_id": o["worker_id"]} if o["worker_id"] else {}
    return Settings(
        model=o["model"],
        weights=o["weights"],
        model_file=o["model_file"],
        labels=o["labels"],
        preprocess=Preprocess(o["resize"], o["crop"], _floats(o["mean"]), _floats(o["std"])),
        device=o["device"],
        precision=o["precision"],
        channels_last=o["channels_last"],
        fold_batch_norm=o["fold_batch_norm"],
        compile=o["compile_"],
        cuda_graphs=o["cuda_graphs"],
        jpeg_decoder=o["jpeg_decoder"],
        redis_url=o["redis_url"],
        store_urls=_store_urls(o["store_urls"]),
        batch_size=o["batch_size"],
        max_wait_ms=o["max_wait_ms"],
        store_wait_ms=o["store_wait_ms"],
        io_threads=o["io_threads"],
        host_threads=o["host_threads"],
        concurrency=o["concurrency"] or _default_concurrency(o["device"]),
        allowed_roots=roots,
        max_bytes=o["max_bytes"],
        max_pixels=o["max_pixels"],
        max_resized_pixels=o["max_resized_pixels"],
        fetch_deadline_s=o["fetch_deadline_s"],
        fetch_timeout_s=o["fetch_timeout_s"],
        fetch_retries=o["fetch_retries"],
        fetch_backoff_s=o["fetch_backoff_s"],
        fetch_max_redirects=o["fetch_max_redirects"],
        ca_bundle=o["ca_bundle"],
        s3_buckets=frozenset(o["s3_buckets"]) or None,
        http_allowed_networks=o["http_networks"],
        visibility_timeout_s=o["visibility_timeout"],
        max_attempts=o["max_attempts"],
        heartbeat_s=o["heartbeat_s"],
        metrics_port=o["metrics_port"],
        metrics_host=o["metrics_host"],
        log_level=o["log_level"].upper(),
        log_json=o["log_json"],
        **extra,
    )


def _store_urls(given: tuple[str, ...]) -> tuple[str, ...]:
    try:
        return parse_urls(given)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--store-url") from e


def _roots(given: tuple[Path, ...]) -> tuple[Path, ...]:
    paths = [Path(p) for g in given for p in str(g).split(os.pathsep) if p]
    return tuple(paths) or (Path.cwd(),)


def _default_concurrency(device: str) -> int:
    return (
        worker_defaults.GPU_CONCURRENCY if _wants_gpu(device) else worker_defaults.CPU_CONCURRENCY
    )


def _wants_gpu(device: str) -> bool:
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    import torch

    return torch.cuda.is_available()
