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
# Threads that fetch and decode images while the device computes.
IO_THREADS = 16
# Pixels above which an image is refused as a decompression bomb (about 90 megapixels).
MAX_PIXELS = 90_000_000
# Bytes above which a source is refused.
MAX_BYTES = 50 * 1024 * 1024
# Port of the Prometheus metrics and health endpoint; 0 turns it off.
METRICS_PORT = 0


@dataclass(frozen=True)
class Preprocess:
    """ImageNet-style preprocessing for a TorchScript model (torchvision models bring their own)."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Settings:
    model: str
    weights: str = "DEFAULT"
    model_file: Path | None = None
    labels: Path | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    # CUDA only: the forward pass as one captured graph per padded batch size.
    cuda_graphs: bool = True
    redis_url: str = defaults.REDIS_URL
    batch_size: int | None = None
    max_wait_ms: float = MAX_WAIT_MS
    io_threads: int = IO_THREADS
    concurrency: int = 4
    allowed_roots: tuple[Path, ...] = ()
    max_bytes: int = MAX_BYTES
    max_pixels: int = MAX_PIXELS
    s3_buckets: frozenset[str] | None = None
    http_allowed_networks: tuple[str, ...] = ()
    visibility_timeout_s: int = defaults.VISIBILITY_TIMEOUT_S
    max_attempts: int = defaults.MAX_ATTEMPTS
    metrics_port: int = METRICS_PORT
    metrics_host: str = "0.0.0.0"
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    log_level: str = "INFO"
    log_json: bool = False

    def validate(self) -> None:
        """Refuse a configuration that cannot work, saying how to fix it."""
        _check(self.batch_size is None or self.batch_size >= 1, "--batch-size must be >= 1")
        _check(self.max_wait_ms >= 0, "--max-wait-ms must be >= 0")
        _check(self.io_threads >= 1, "--io-threads must be >= 1")
        _check(self.concurrency >= 1, "--concurrency must be >= 1")
        _check(self.max_attempts >= 1, "--max-attempts must be >= 1")
        _check(self.visibility_timeout_s >= 5, "--visibility-timeout must be at least 5 seconds")
        _check(self.max_pixels >= 10_000, "--max-pixels must be at least 10000")
        _check(
            self.precision in ("auto", "fp32", "fp16", "bf16"),
            "--precision must be one of auto, fp32, fp16, bf16",
        )
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
