"""``python -m bench``: the seed loop, the in-process ceiling and the service end to end, in one
run on one machine, with the same images and models; JSON to a file and a markdown table.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from dataclasses import replace
from pathlib import Path

from bench.config import (
    CPU_SIZES,
    EXTRA_STAGES,
    GPU_SIZES,
    MODELS,
    QUICK_MODEL,
    QUICK_SIZES,
    STAGES,
    BenchConfig,
    Sizes,
    default_options,
)
from bench.images import IMAGE_SETS
from bench.mixed_images import ALL_IMAGE_SETS
from worker.settings import JPEG_DECODERS

# Where results go by default, under the working directory. bench/results/ in the repository
# is the record of past runs, copied there by hand; a run never writes into the package.
OUT_DIR = Path("bench-results")


def _list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in _list(text))


def _pool(text: str) -> dict[str, int]:
    pairs = (item.split("=", 1) for item in _list(text))
    return {name: int(count) for name, count in pairs}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, a few images")
    p.add_argument("--models", type=_list, help=f"comma-separated [default: {','.join(MODELS)}]")
    sets = ",".join(ALL_IMAGE_SETS)
    p.add_argument("--images", type=_list, default=tuple(IMAGE_SETS), help=f"image sets: {sets}")
    every = ",".join(STAGES + EXTRA_STAGES)
    p.add_argument("--stages", type=_list, default=STAGES, help=f"subset of {every}")
    p.add_argument("--label", help="names the results file [default: host name]")
    p.add_argument("--out", type=Path, help=f"JSON path [default: ./{OUT_DIR}/LABEL.json]")
    p.add_argument("--image-dir", type=Path, help="keep generated images here and reuse them")
    p.add_argument("--log-dir", type=Path, help="keep worker logs here")
    w = p.add_argument_group("worker options (same for the in-process ceiling and the workers)")
    w.add_argument("--device", default="auto", help="auto, cpu, cuda")
    w.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"])
    w.add_argument("--batch-size", type=int)
    w.add_argument("--max-wait-ms", type=float)
    w.add_argument("--io-threads", type=int)
    w.add_argument("--concurrency", type=int)
    w.add_argument("--channels-last", action=argparse.BooleanOptionalAction)
    w.add_argument("--compile", action=argparse.BooleanOptionalAction)
    w.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction)
    w.add_argument("--jpeg-decoder", choices=JPEG_DECODERS)
    w.add_argument("--torch-threads", type=int, help="intra-op threads, everywhere")
    w.add_argument(
        "--flush-denormal",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="flush denormal floats in the seed loop and ceiling, as workers always do",
    )
    w.add_argument("--workers", type=int, default=1, help="worker processes for the headline")
    w.add_argument("--scale-out", type=_ints, help="worker counts to measure, e.g. 1,2,4")
    w.add_argument(
        "--shards", type=int, default=1, help="host path: measure again over N Redis shards"
    )
    w.add_argument(
        "--device-stand-in",
        action="store_true",
        help="host path: measure the GPU path too, with a device stand-in that costs nothing",
    )
    s = p.add_argument_group("sizes (defaults depend on the device and --quick)")
    s.add_argument("--pool", type=_pool, help="distinct images per set, e.g. imagenet=512,12mp=32")
    for name in ("seed_seconds", "ceiling_seconds", "e2e_seconds", "latency_seconds"):
        s.add_argument("--" + name.replace("_", "-"), type=float)
    ints = ("seed_max", "e2e_jobs", "e2e_min", "e2e_max", "latency_n", "submit_jobs", "warmup_jobs")
    for name in (*ints, "hostpath_jobs", "peer_images"):
        s.add_argument("--" + name.replace("_", "-"), type=int)
    return p


def _device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sizes(args: argparse.Namespace, gpu: bool) -> Sizes:
    base = QUICK_SIZES if args.quick else GPU_SIZES if gpu else CPU_SIZES
    names: tuple[str, ...] = (
        "seed_seconds",
        "ceiling_seconds",
        "e2e_seconds",
        "latency_seconds",
        "seed_max",
    )
    names += ("e2e_jobs", "e2e_max", "latency_n", "submit_jobs", "warmup_jobs")
    names += ("hostpath_jobs", "peer_images")
    given = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.pool:
        given["pool"] = {**base.pool, **args.pool}
    return replace(base, **given)


def build_config(args: argparse.Namespace) -> BenchConfig:
    device = _device(args.device)
    options = default_options(
        device,
        precision=args.precision,
        batch_size=args.batch_size,
        max_wait_ms=args.max_wait_ms,
        io_threads=args.io_threads,
        concurrency=args.concurrency,
        channels_last=args.channels_last,
        compile=args.compile,
        cuda_graphs=args.cuda_graphs,
        jpeg_decoder=args.jpeg_decoder,
        torch_threads=args.torch_threads,
    )
    unknown = set(args.images) - set(ALL_IMAGE_SETS)
    if unknown:
        raise SystemExit(
            f"unknown image set(s) {sorted(unknown)}; choose from {list(ALL_IMAGE_SETS)}"
        )
    every = STAGES + EXTRA_STAGES
    bad = set(args.stages) - set(every)
    if bad:
        raise SystemExit(f"unknown stage(s) {sorted(bad)}; choose from {', '.join(every)}")
    label = args.label or socket.gethostname()
    scale_out = tuple(sorted(set(args.scale_out or ()) | {args.workers}))
    return BenchConfig(
        label=label,
        out=args.out or Path.cwd() / OUT_DIR / f"{label}.json",
        models=args.models or ((QUICK_MODEL,) if args.quick else MODELS),
        image_sets=args.images,
        stages=tuple(s for s in every if s in args.stages),
        options=options,
        sizes=_sizes(args, options.on_gpu),
        scale_out=scale_out,
        workers=args.workers,
        shards=args.shards,
        stand_in=args.device_stand_in,
        image_dir=args.image_dir,
        log_dir=args.log_dir,
        flush_denormal=args.flush_denormal,
    )


def _terminate(signum: int, frame: object) -> None:
    """A timeout's SIGTERM unwinds like Ctrl-C, so workers and Redis are stopped on the way."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    cfg = build_config(parser().parse_args(argv))
    signal.signal(signal.SIGTERM, _terminate)
    from bench.report import markdown
    from bench.runner import run

    report = run(cfg)
    print(markdown(report))
    print(f"results: {cfg.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
