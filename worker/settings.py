"""The worker's settings: built once from CLI flags (with environment fallbacks) and passed down."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from contract import defaults

# Jobs per forward pass on a GPU, and on a CPU (where larger batches measured slower: README).
GPU_BATCH_SIZE = 256
CPU_BATCH_SIZE = 8
# Longest wait for a batch to fill before running it anyway.
MAX_WAIT_MS = 5.0
# Results the store stage gathers for one Redis call (at least a device batch) while more jobs
# are in flight: the finish script's per-call cost is paid once for all of them, where one call
# per CPU batch of 8 cost Redis most of its CPU per job (issue 10).
STORE_BATCH = 64
# Longest wait, once a result is ready, for more to store with it while more jobs are in flight;
# with none in flight a result is stored at once. 20 ms lets a message of 64 small jobs on a CPU
# go to Redis in one or two calls where 5 ms made three or four (each call cost Redis about
# 77 µs besides its jobs on the 2-core VM: README, "Per-job cost").
STORE_WAIT_MS = 20.0
# Threads that fetch and decode images from the network while the device computes (local files
# are loaded by the host threads: one per core the process has).
IO_THREADS = 16
# Most jobs a host thread hands to the pipeline at once, and how long the first of them waits
# for more (it is handed over with the first load that ends after this): each hand-over wakes
# the pipeline's assemble thread (on small images one a CPU batch of 8 cost more than the
# batch), and neither a GPU batch of 256 nor a CPU batch of large photos should wait for one
# thread to load all of it.
HOST_HANDOVER = 64
HOST_HANDOVER_WAIT_MS = 5.0
# Pixels above which an image is refused as a decompression bomb (about 90 megapixels).
MAX_PIXELS = 90_000_000
# Pixels the preprocessing's resize may produce from one image (a 1x20000 PNG resized to a
# short side of 256 would make 1.3 billion): about 250:1 panoramas at a resize of 256.
MAX_RESIZED_PIXELS = 16_000_000
# Bytes above which a source is refused.
MAX_BYTES = 50 * 1024 * 1024
# Longest wait for the worker's own threads and pools to stop, once Celery has drained its tasks
# (well inside the deploy files' 120 s grace period).
CLOSE_TIMEOUT_S = 10.0
# Seconds one fetch may take in all (retries, redirects and slow bodies included).
FETCH_DEADLINE_S = 30.0
# Connect and per-read timeout of one S3 or http(s) request, in seconds.
FETCH_TIMEOUT_S = 10.0
# Retries of a transient fetch failure (throttling, 5xx, timeouts) after the first attempt.
FETCH_RETRIES = 3
# Base of the retries' exponential backoff with full jitter, in seconds.
FETCH_BACKOFF_S = 0.2
# Redirects followed per http(s) fetch.
FETCH_MAX_REDIRECTS = 3
# Port of the Prometheus metrics and health endpoint; 0 turns it off.
METRICS_PORT = 0
# Address the metrics and health endpoint listens on.
METRICS_HOST = "0.0.0.0"
# Queue messages handled at once on a GPU, and on a CPU (two messages of up to 128 jobs keep a
# CPU process's host thread busy; each more is work a high-priority job waits behind).
GPU_CONCURRENCY = 16
CPU_CONCURRENCY = 2
# torchvision's pretrained weights for the model.
WEIGHTS = "DEFAULT"
# Device and numeric precision chosen at startup ("auto": the GPU if there is one).
DEVICE = "auto"
PRECISION = "auto"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
LOG_LEVEL = "INFO"
# Worker processes on this host: "auto" is one single-threaded process per core on a CPU, and
# PROCESSES_PER_GPU per GPU on a GPU host (worker/supervisor.py; README "Processes per host").
PROCESSES = "auto"
# 4: on an H200 with CUDA graphs, 4 processes did 2.9-3.6x one process's rate, and in eager mode
# 8 did no better than 4 (README "Throughput", bench/results/h200-run3-*).
PROCESSES_PER_GPU = 4
# How torch's OpenMP threads wait between parallel regions, unless the operator sets
# OMP_WAIT_POLICY: libgomp's default spins a core for a while after each region, which between
# small batches burnt more CPU than the whole job path (README "Per-job cost"); passive sleeps.
OMP_WAIT_POLICY = "PASSIVE"


@dataclass(frozen=True)
class Preprocess:
    """ImageNet-style preprocessing for a TorchScript model (torchvision models bring their own)."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


# Who decodes JPEGs on a CUDA device: torchvision's nvJPEG, or nvImageCodec (worker.nvdecode).
JPEG_DECODERS = ("torchvision", "nvimgcodec")


@dataclass(frozen=True)
class Settings:
    model: str
    weights: str = WEIGHTS
    model_file: Path | None = None
    labels: Path | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    device: str = DEVICE
    precision: str = PRECISION
    channels_last: bool = True
    # CPU only: batch norms after convolutions folded into their weights (worker.inference).
    fold_batch_norm: bool = True
    compile: bool = False
    # CUDA only: the forward pass as one captured graph per padded batch size.
    cuda_graphs: bool = True
    # CUDA only: who decodes JPEGs on the device, one of JPEG_DECODERS.
    jpeg_decoder: str = "torchvision"
    redis_url: str = defaults.REDIS_URL
    # Redis instances holding the job records (contract.shards); empty: redis_url alone.
    store_urls: tuple[str, ...] = ()
    batch_size: int | None = None
    max_wait_ms: float = MAX_WAIT_MS
    store_wait_ms: float = STORE_WAIT_MS
    io_threads: int = IO_THREADS
    # Threads that load local files; None: as many as the process has torch threads.
    host_threads: int | None = None
    concurrency: int = CPU_CONCURRENCY
    allowed_roots: tuple[Path, ...] = ()
    max_bytes: int = MAX_BYTES
    max_pixels: int = MAX_PIXELS
    max_resized_pixels: int = MAX_RESIZED_PIXELS
    fetch_deadline_s: float = FETCH_DEADLINE_S
    fetch_timeout_s: float = FETCH_TIMEOUT_S
    fetch_retries: int = FETCH_RETRIES
    fetch_backoff_s: float = FETCH_BACKOFF_S
    fetch_max_redirects: int = FETCH_MAX_REDIRECTS
    ca_bundle: Path | None = None
    s3_buckets: frozenset[str] | None = None
    http_allowed_networks: tuple[str, ...] = ()
    visibility_timeout_s: int = defaults.VISIBILITY_TIMEOUT_S
    max_attempts: int = defaults.MAX_ATTEMPTS
    heartbeat_s: float = defaults.HEARTBEAT_S
    metrics_port: int = METRICS_PORT
    metrics_host: str = METRICS_HOST
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    log_level: str = LOG_LEVEL
    log_json: bool = False

    def validate(self) -> None:
        """Refuse a configuration that cannot work, saying how to fix it."""
        _check(self.batch_size is None or self.batch_size >= 1, "--batch-size must be >= 1")
        _check(self.max_wait_ms >= 0, "--max-wait-ms must be >= 0")
        _check(self.store_wait_ms >= 0, "--store-wait-ms must be >= 0")
        _check(self.io_threads >= 1, "--io-threads must be >= 1")
        _check(self.host_threads is None or self.host_threads >= 1, "--host-threads must be >= 1")
        _check(self.concurrency >= 1, "--concurrency must be >= 1")
        _check(self.max_attempts >= 1, "--max-attempts must be >= 1")
        _check(self.visibility_timeout_s >= 5, "--visibility-timeout must be at least 5 seconds")
        _check(self.max_pixels >= 10_000, "--max-pixels must be at least 10000")
        _check(self.max_resized_pixels >= 10_000, "--max-resized-pixels must be at least 10000")
        _check(self.max_bytes >= 1, "--max-bytes must be >= 1")
        _check(self.fetch_timeout_s > 0, "--fetch-timeout-s must be > 0")
        _check(self.fetch_deadline_s > 0, "--fetch-deadline-s must be > 0")
        _check(self.fetch_retries >= 0, "--fetch-retries must be >= 0")
        _check(self.fetch_backoff_s >= 0, "--fetch-backoff-s must be >= 0")
        _check(self.fetch_max_redirects >= 0, "--fetch-max-redirects must be >= 0")
        _check(
            self.ca_bundle is None or self.ca_bundle.is_file(),
            f"--ca-bundle {self.ca_bundle} is not a file: give a PEM file of CA certificates",
        )
        _check(self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}")
        _check(
            self.labels is None or self.labels.is_file(),
            f"--labels {self.labels} is not a file: give a text file with one label per line",
        )
        _check(
            self.model_file is None or self.model_file.is_file(),
            f"--model-file {self.model_file} is not a file: give a torch.jit.save()d model",
        )
        for root in self.allowed_roots:
            _check(root.is_dir(), f"--allowed-root {root} is not a directory")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
