"""``python -m bench.gil_probe``: how much Python threads slow a forward pass down.

The worker's forward pass launches one operation at a time from Python; every operation that
releases the GIL must win it back from the I/O threads. This probe times a forward pass alone and
beside threads doing the worker's own per-image Python work (reading a JPEG header), at the
default and a short GIL switch interval. It explains the GPU figures in the README.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable

import torch
import torchvision

from demo.images import make_jpeg
from worker.decode import DecodePolicy, open_checked


def _forward_ms(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        for _ in range(repeats):
            model(x)
    return (time.perf_counter() - started) / repeats * 1e3


def with_busy_threads(threads: int, run: Callable[[], float]) -> float:
    stop = threading.Event()
    data, policy = make_jpeg(), DecodePolicy(max_pixels=10**8)

    def busy() -> None:
        while not stop.is_set():
            open_checked(data, policy)

    workers = [threading.Thread(target=busy, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    time.sleep(0.2)
    try:
        return run()
    finally:
        stop.set()
        for w in workers:
            w.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v3_small")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = torchvision.models.get_model(args.model).eval()
    x = torch.randn(2, 3, 224, 224)
    _forward_ms(model, x, 3)
    result = {
        "model": args.model,
        "busy_threads": args.threads,
        "alone_ms": _forward_ms(model, x, 20),
    }
    for interval in (0.005, 0.0005):
        sys.setswitchinterval(interval)
        ms = with_busy_threads(args.threads, lambda: _forward_ms(model, x, args.repeats))
        result[f"busy_ms_switch_{interval}"] = ms
    sys.setswitchinterval(0.005)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
