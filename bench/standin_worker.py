"""``python -m bench.standin_worker [worker flags]``: ``python -m worker`` on its GPU path with the
device stand-in of ``bench.standin`` in place of the GPU (the bench's ``--device-stand-in``)."""

from __future__ import annotations

import os

from worker.cli import cpu_thread_env


def main() -> None:
    os.environ.update(cpu_thread_env(os.environ))  # before torch is imported, as the worker does
    from bench.standin import StandInClassifier
    from worker import app
    from worker.cli import main as worker_main

    app.Classifier = StandInClassifier  # type: ignore[misc]
    worker_main(prog_name="python -m bench.standin_worker")


if __name__ == "__main__":
    main()
