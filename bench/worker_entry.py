"""``python -m bench.worker_entry ARGS``: exactly ``python -m worker ARGS``, with denormal floats
flushed to zero first.

Random weights (all this machine can load) drive some CPU kernels into denormal numbers, which
run up to a hundred times slower; trained weights do not. The benchmark flushes them in every
process it measures (seed loop, in-process ceiling, workers), so each figure is what the same
code would do with real weights. Set before the worker starts any thread: threads inherit it.
"""

import torch

from worker.cli import main

torch.set_flush_denormal(True)
main(prog_name="python -m worker")
