"""The throughput benchmark of issue 3: ``python -m bench [--quick] [options]``.

One run, one machine, the same generated images and models, four figures: (a) the seed's
textbook loop, (b) the worker's own runtime in-process with no queue, (c) end to end through a
private Redis and real worker processes, (d) latency at low load; plus bulk submission. See
``python -m bench --help``; ``bench/device_run.sh`` is the GPU run.
"""
