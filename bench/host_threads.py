"""``python -m bench.host_threads``: what the CPU path's per-image load costs on 1 to 16 threads.

Each thread takes the next of the host path's small JPEGs (``bench.hostpath.SMALL``) and does
what the worker does with a local file on a CPU device: read it, decode it (``decode_rgb``),
resize and crop it (``crop_on_host``). The CPU of the whole process is divided by the images:
the same work, so whatever grows with the thread count is the threads taking turns at the GIL.
It is why a CPU worker loads local files on as many threads as it has cores (README "Per-job
cost"). Prints JSON; ``--out`` saves it too.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms._presets import ImageClassification

from bench.hostpath import NULL_PREPROCESS, SMALL
from bench.images import image_pool
from worker.decode import DecodePolicy, decode_rgb
from worker.inference import crop_on_host

THREAD_COUNTS = (1, 2, 4, 16)


def _load_all(waiting: deque[Path], policy: DecodePolicy, transforms: ImageClassification) -> None:
    while True:
        try:
            path = waiting.popleft()
        except IndexError:
            return
        crop_on_host(decode_rgb(path.read_bytes(), policy), transforms)


def host_path_preprocessing() -> tuple[DecodePolicy, ImageClassification]:
    """The decode policy and transforms of the host path's worker (``--resize 16 --crop 16``)."""
    side = int(NULL_PREPROCESS[1])
    policy = DecodePolicy(max_pixels=10**8, draft_min_side=2 * side, resize_size=(side,))
    return policy, ImageClassification(crop_size=side, resize_size=side)


def cpu_us_per_image(paths: list[Path], threads: int, rounds: int) -> dict[str, float]:
    """Process CPU and wall time per image with ``threads`` threads loading ``paths``."""
    policy, transforms = host_path_preprocessing()
    waiting = deque(paths * rounds)
    count = len(waiting)
    cpu, wall = time.process_time(), time.perf_counter()
    workers = [
        threading.Thread(target=_load_all, args=(waiting, policy, transforms))
        for _ in range(threads)
    ]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return {
        "threads": threads,
        "cpu_us_per_image": (time.process_time() - cpu) / count * 1e6,
        "wall_us_per_image": (time.perf_counter() - wall) / count * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=400, help="distinct JPEGs, each read --rounds")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", default=",".join(map(str, THREAD_COUNTS)))
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="imgcls-host-threads-") as tmp:
        paths = image_pool(Path(tmp), SMALL, args.images)
        # Page cache and lazy imports warmed outside the figures.
        _load_all(deque(paths), *host_path_preprocessing())
        runs = [cpu_us_per_image(paths, int(n), args.rounds) for n in args.threads.split(",")]
    report: dict[str, Any] = {"image": f"{SMALL.width}x{SMALL.height} JPEG", "runs": runs}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
