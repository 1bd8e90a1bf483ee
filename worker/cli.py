"""``python -m worker``: every option a flag, each with an environment-variable fallback."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from contract import defaults
from worker.settings import IO_THREADS, MAX_BYTES, MAX_PIXELS, MAX_WAIT_MS, Preprocess, Settings

log = logging.getLogger("worker")


def _floats(text: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in text.split(","))
    if len(values) != 3:
        raise click.BadParameter("give three comma-separated numbers, one per RGB channel")
    return values  # type: ignore[return-value]


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
    default="DEFAULT",
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
@click.option("--resize", default=256, help="TorchScript models: resize the shorter side to this.")
@click.option("--crop", default=224, help="TorchScript models: center-crop to this square.")
@click.option("--mean", default="0.485,0.456,0.406", help="TorchScript models: normalise mean.")
@click.option("--std", default="0.229,0.224,0.225", help="TorchScript models: normalise std.")
@click.option(
    "--device",
    envvar="IMGCLS_DEVICE",
    default="auto",
    help="auto, cpu, cuda or cuda:N. One worker process per GPU.",
)
@click.option(
    "--precision",
    envvar="IMGCLS_PRECISION",
    default="auto",
    type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
    help="auto is fp16 on a GPU and fp32 on a CPU.",
)
@click.option("--channels-last/--no-channels-last", default=True, help="NHWC memory layout.")
@click.option(
    "--compile/--no-compile",
    "compile_",
    envvar="IMGCLS_COMPILE",
    default=False,
    help="torch.compile the model at startup (slower start, faster batches).",
)
@click.option(
    "--redis-url",
    envvar="REDIS_URL",
    default=defaults.REDIS_URL,
    help="Broker and job store; rediss://, unix://, redis+sentinel://host:port,…/service[/db].",
)
@click.option(
    "--batch-size",
    envvar="IMGCLS_BATCH_SIZE",
    type=int,
    help="Most jobs per forward pass [default: 256 on a GPU, 8 on a CPU].",
)
@click.option(
    "--max-wait-ms",
    envvar="IMGCLS_MAX_WAIT_MS",
    default=MAX_WAIT_MS,
    help="Longest wait for a batch to fill before it runs anyway.",
)
@click.option(
    "--io-threads",
    envvar="IMGCLS_IO_THREADS",
    default=IO_THREADS,
    help="Threads fetching and decoding images while the device computes.",
)
@click.option(
    "--concurrency",
    envvar="IMGCLS_CONCURRENCY",
    type=int,
    help="Queue messages handled at once [default: 16 on a GPU, 4 on a CPU].",
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
    default=MAX_BYTES,
    help="Largest source accepted, in bytes.",
)
@click.option(
    "--max-pixels",
    envvar="IMGCLS_MAX_PIXELS",
    default=MAX_PIXELS,
    help="Largest image accepted, in pixels (decompression-bomb guard; cannot be off).",
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
    "--metrics-port",
    envvar="IMGCLS_METRICS_PORT",
    default=0,
    help="Serve /metrics (Prometheus), /healthz (liveness) and /readyz (model warm and "
    "consuming) on this port; 0 turns them off.",
)
@click.option(
    "--metrics-host",
    envvar="IMGCLS_METRICS_HOST",
    default="0.0.0.0",
    help="Address the metrics and health endpoint listens on.",
)
@click.option("--worker-id", envvar="IMGCLS_WORKER_ID", help="[default: HOSTNAME-PID]")
@click.option("--log-level", envvar="IMGCLS_LOG_LEVEL", default="INFO")
@click.option(
    "--log-json/--no-log-json",
    envvar="IMGCLS_LOG_JSON",
    default=False,
    help="Log JSON lines instead of text.",
)
def main(**opts: object) -> None:
    """Serve one classification model from its own queue, with the model warm in memory."""
    settings = _settings(opts)
    configure_logging(settings.log_level, settings.log_json)
    from worker.app import run_worker, setup
    from worker.health import HealthServer
    from worker.models import ModelLoadError

    # Up before the model loads: live but not ready while it warms.
    port = settings.metrics_port
    health = HealthServer(settings.metrics_host, port).start() if port else None
    try:
        runtime = setup(settings)
    except (ModelLoadError, ValueError) as e:
        log.critical("worker not started: %s", e)
        sys.exit(2)
    if health is not None:
        health.attach(runtime)
    sys.exit(run_worker(runtime, heartbeat_s=defaults.HEARTBEAT_S))


def _settings(o: dict) -> Settings:
    gpu_default = 16
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
        compile=o["compile_"],
        redis_url=o["redis_url"],
        batch_size=o["batch_size"],
        max_wait_ms=o["max_wait_ms"],
        io_threads=o["io_threads"],
        concurrency=o["concurrency"] or (gpu_default if _wants_gpu(o["device"]) else 4),
        allowed_roots=roots,
        max_bytes=o["max_bytes"],
        max_pixels=o["max_pixels"],
        s3_buckets=frozenset(o["s3_buckets"]) or None,
        http_allowed_networks=o["http_networks"],
        visibility_timeout_s=o["visibility_timeout"],
        max_attempts=o["max_attempts"],
        metrics_port=o["metrics_port"],
        metrics_host=o["metrics_host"],
        log_level=o["log_level"].upper(),
        log_json=o["log_json"],
        **extra,
    )


def _roots(given: tuple[Path, ...]) -> tuple[Path, ...]:
    paths = [Path(p) for g in given for p in str(g).split(os.pathsep) if p]
    return tuple(paths) or (Path.cwd(),)


def _wants_gpu(device: str) -> bool:
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    import torch

    return torch.cuda.is_available()


def configure_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler()
    if as_json:
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # Celery logs every message at INFO; at thousands of images a second that drowns the rest.
    for name in ("celery.worker.strategy", "celery.app.trace"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))
