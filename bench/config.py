"""What one benchmark run does: models, image sets, stages, sizes, and the worker's options.

The worker options are resolved to explicit values once and given to both the in-process
ceiling and the worker processes, so the two are measured with exactly the same settings.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from contract import defaults
from worker.settings import CPU_BATCH_SIZE, GPU_BATCH_SIZE, IO_THREADS, MAX_WAIT_MS, Settings

STAGES = ("submit", "seed", "ceiling", "e2e", "latency", "hostpath")
# Stages run only when asked for: the peer needs the ``bench`` extra (LitServe).
EXTRA_STAGES = ("peer",)
# Stages that run per model, on the image sets.
MODEL_STAGES = ("seed", "ceiling", "e2e", "latency")
MODELS = ("resnet50", "efficientnet_b0", "mobilenet_v3_large")
# The smallest torchvision classifier: enough to exercise every stage in seconds.
QUICK_MODEL = "mobilenet_v3_small"
# Queue messages the worker CLI handles at once when --concurrency is not given.
GPU_CONCURRENCY = 16
CPU_CONCURRENCY = 4
# Labels asked for per job, as a typical caller would.
TOP_K = defaults.TOP_K


@dataclass(frozen=True)
class WorkerOptions:
    """The worker's flags that change throughput, each an explicit value."""

    device: str
    precision: str = "auto"
    batch_size: int = CPU_BATCH_SIZE
    max_wait_ms: float = MAX_WAIT_MS
    io_threads: int = IO_THREADS
    concurrency: int = CPU_CONCURRENCY
    channels_last: bool = True
    compile: bool = False
    # CUDA graphs of the forward pass (on CUDA only; the worker's default).
    cuda_graphs: bool = True
    # Who decodes JPEGs on CUDA (worker.settings.JPEG_DECODERS).
    jpeg_decoder: str = "torchvision"
    # torch intra-op threads in the benchmark and every worker; None leaves torch's default.
    torch_threads: int | None = None

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def cli_args(self) -> list[str]:
        """The same options as ``python -m worker`` flags."""
        return [
            *("--device", self.device, "--precision", self.precision),
            *("--batch-size", str(self.batch_size), "--max-wait-ms", str(self.max_wait_ms)),
            *("--io-threads", str(self.io_threads), "--concurrency", str(self.concurrency)),
            "--channels-last" if self.channels_last else "--no-channels-last",
            "--compile" if self.compile else "--no-compile",
            "--cuda-graphs" if self.cuda_graphs else "--no-cuda-graphs",
            *("--jpeg-decoder", self.jpeg_decoder),
        ]

    def settings(self, model: str, redis_url: str, roots: tuple[Path, ...]) -> Settings:
        """The same options as the ``Settings`` the worker CLI would build from ``cli_args``."""
        return Settings(
            model=model,
            weights="none",
            device=self.device,
            precision=self.precision,
            channels_last=self.channels_last,
            compile=self.compile,
            cuda_graphs=self.cuda_graphs,
            jpeg_decoder=self.jpeg_decoder,
            redis_url=redis_url,
            batch_size=self.batch_size,
            max_wait_ms=self.max_wait_ms,
            io_threads=self.io_threads,
            concurrency=self.concurrency,
            allowed_roots=roots,
            log_level="WARNING",
        )


def default_options(device: str, **given: Any) -> WorkerOptions:
    """The worker CLI's defaults for ``device``, overridden by the options given."""
    gpu = device.startswith("cuda")
    base = WorkerOptions(
        device=device,
        batch_size=GPU_BATCH_SIZE if gpu else CPU_BATCH_SIZE,
        concurrency=GPU_CONCURRENCY if gpu else CPU_CONCURRENCY,
    )
    return replace(base, **{k: v for k, v in given.items() if v is not None})


@dataclass(frozen=True)
class Sizes:
    """How much work each stage does. Stages stop on whichever limit comes first."""

    # Distinct images generated per image set; jobs cycle over them.
    pool: dict[str, int]
    # Naive loop: seconds, and most images.
    seed_seconds: float
    seed_max: int
    # In-process ceiling: images = a pilot run's rate x seconds, within [min, max].
    ceiling_seconds: float
    ceiling_min: int
    ceiling_max: int
    # Forward-only ceiling: seconds of full batches.
    forward_seconds: float
    # End to end: jobs for about e2e_seconds within [min, max], unless e2e_jobs fixes it.
    e2e_seconds: float
    e2e_min: int
    e2e_max: int
    # Jobs run, unmeasured, before each throughput measurement (allocator, cuDNN autotuning).
    warmup_jobs: int
    # Low-load latency: samples, and a time cap.
    latency_n: int
    latency_seconds: float
    # Jobs enqueued to measure bulk submission.
    submit_jobs: int
    # Measurements of the seed loop, the ceiling and end to end, alternating; the best is kept.
    repeat: int = 1
    e2e_jobs: int | None = None
    # Host path (bench/hostpath.py): jobs per measurement, each on its own small JPEG.
    hostpath_jobs: int = 4000
    # Peer comparison (bench/peer.py): ImageNet-size images per pass.
    peer_images: int = 384


CPU_SIZES = Sizes(
    pool={"imagenet": 64, "12mp": 8, "mixed": 64},
    seed_seconds=8,
    seed_max=200,
    ceiling_seconds=8,
    ceiling_min=96,
    ceiling_max=5000,
    forward_seconds=5,
    e2e_seconds=8,
    e2e_min=96,
    e2e_max=5000,
    warmup_jobs=32,
    latency_n=30,
    latency_seconds=15,
    submit_jobs=100_000,
    repeat=3,
)

GPU_SIZES = Sizes(
    pool={"imagenet": 1024, "12mp": 64, "mixed": 1024},
    seed_seconds=10,
    seed_max=300,
    ceiling_seconds=6,
    ceiling_min=1024,
    ceiling_max=100_000,
    forward_seconds=3,
    e2e_seconds=5,
    e2e_min=1024,
    e2e_max=60_000,
    warmup_jobs=2048,
    latency_n=200,
    latency_seconds=10,
    submit_jobs=100_000,
)

QUICK_SIZES = Sizes(
    pool={"imagenet": 6, "12mp": 2, "mixed": 6},
    seed_seconds=2,
    seed_max=3,
    ceiling_seconds=2,
    ceiling_min=8,
    ceiling_max=24,
    forward_seconds=0.5,
    e2e_seconds=2,
    e2e_min=8,
    e2e_max=24,
    warmup_jobs=4,
    latency_n=4,
    latency_seconds=10,
    submit_jobs=2000,
    hostpath_jobs=60,
    peer_images=16,
)


@dataclass(frozen=True)
class BenchConfig:
    label: str
    out: Path
    models: tuple[str, ...]
    image_sets: tuple[str, ...]
    stages: tuple[str, ...]
    options: WorkerOptions
    sizes: Sizes
    # Worker counts measured end to end; ratios use ``workers``.
    scale_out: tuple[int, ...] = (1,)
    workers: int = 1
    # Host path: also measured with the job records over this many Redis instances.
    shards: int = 1
    # Host path: also measure the GPU path with a device stand-in (bench/standin.py).
    stand_in: bool = False
    image_dir: Path | None = None
    log_dir: Path | None = None
    # Flush denormal floats to zero in the in-process stages, as workers do at setup: random
    # weights produce denormals that trained weights do not, and they slow CPU kernels 100-fold.
    flush_denormal: bool = True
