"""Several complete workers per host: ``python -m worker`` starts them, watches them, stops them.

Per-image Python work runs under one GIL, so one process tops out near a few hundred images a
second per core whatever the device (issues 10 and 11). The supervisor runs N ordinary workers
(``python -m worker ... --processes 1``), each a child process with its own GIL, its own Celery
consumer and its own model copy: on a CPU one single-threaded process per core, on a GPU host
``--processes-per-gpu`` of them per GPU. Each child is a complete worker, so every guarantee
holds as before: a job is acked only after its result is stored, and a killed child's messages
go back to the queue (worker/recovery.py), at once when its replacement, which keeps the same
worker ID, starts.

Children are started with fork+exec (never a bare fork: the parent may have touched CUDA), in
their own process group, so a terminal's Ctrl-C reaches them once, through the parent. The
first child starts alone and the rest once it is warm: a model that cannot load prints its one
line once, and the weights are downloaded once. A child that dies is started again with
exponential backoff; one that exits 2 (bad option or model), 3 (Redis unreachable) or 4 (Redis
refused the password) would fail the same way again, so the parent stops the rest and exits
with that code for its own supervisor (systemd, Kubernetes) to see.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

log = logging.getLogger("worker.supervisor")

# Exit codes of a child that would fail the same way at every start (see worker/cli.py).
FATAL_EXIT_CODES = frozenset({2, 3, 4})
# Backoff before restarting a child that died: doubles from the first to the most.
RESTART_BACKOFF_S = 1.0
RESTART_BACKOFF_MAX_S = 30.0
# A child that ran this long before dying starts again with the first backoff.
STABLE_AFTER_S = 60.0
# Longest wait for the children's warm shutdown after SIGTERM, before SIGKILL (inside the
# deploy files' 120 s grace period).
SHUTDOWN_GRACE_S = 100.0
# How often the parent looks at its children.
POLL_S = 0.2
# Linux prctl option: a signal to the child when the parent dies (even by SIGKILL).
_PR_SET_PDEATHSIG = 1


# -- the layout ------------------------------------------------------------------------------


def parse_processes(text: str) -> int | None:
    """``auto`` (None) or a count of at least 1."""
    if text.strip().lower() == "auto":
        return None
    count = int(text)
    if count < 1:
        raise ValueError("--processes must be auto or >= 1")
    return count


def cpu_count() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota."""
    cores = len(os.sched_getaffinity(0))
    quota = _cgroup_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cgroup_quota() -> float | None:
    """CPUs the cgroup's quota allows (v2 ``cpu.max``, v1 ``cfs_quota_us``), None if unlimited."""
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    with contextlib.suppress(OSError, ValueError):
        base = Path("/sys/fs/cgroup/cpu")
        quota_us = int((base / "cpu.cfs_quota_us").read_text())
        period_us = int((base / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 else None
    return None


def gpu_count(device: str) -> int:
    """GPUs the children should spread over: 0 for a CPU layout."""
    if device == "cpu" or not (device == "auto" or device.startswith("cuda")):
        return 0
    import torch  # only here: a CPU-only parent never imports it

    return torch.cuda.device_count()


def plan_devices(
    processes: int | None, device: str, per_gpu: int, gpus: int, cores: int
) -> list[str]:
    """The ``--device`` of each child; one entry means no supervisor (this process serves).

    ``auto`` processes: ``per_gpu`` per GPU on a GPU host, one per core on a CPU. A device
    ``cuda:N`` keeps every child on that GPU; ``auto`` or ``cuda`` spreads them over all.
    """
    if gpus == 0:
        return ["cpu" if device == "auto" else device] * (processes or cores)
    if device.startswith("cuda:"):
        return [device] * (processes or per_gpu)
    count = processes or per_gpu * gpus
    return [f"cuda:{i % gpus}" for i in range(count)]


def threads_per_child(children: int, cores: int) -> int:
    """torch threads of each CPU child: the cores shared out, at least one."""
    return max(1, cores // children)


# -- the children ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ChildSpec:
    """What makes one child: its index, worker ID, device, metrics port and environment."""

    index: int
    worker_id: str
    device: str
    metrics_port: int
    env: dict[str, str] = field(default_factory=dict)


def child_specs(
    devices: Sequence[str], base_id: str, metrics_port: int, cores: int
) -> list[ChildSpec]:
    """One spec per device. IDs are ``<base>-<index>`` (a restarted child keeps its ID, so it
    reclaims what its predecessor held); metrics ports are ``base + index`` (0 stays off)."""
    threads = threads_per_child(len(devices), cores)
    specs = []
    for i, device in enumerate(devices):
        cpu_env = {} if device.startswith("cuda") else _thread_env(threads)
        port = metrics_port + i if metrics_port else 0
        specs.append(ChildSpec(i, f"{base_id}-{i}", device, port, cpu_env))
    return specs


def _thread_env(threads: int) -> dict[str, str]:
    """Thread counts for torch's CPU kernels, unless the operator set them already."""
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    return {name: str(threads) for name in names if name not in os.environ}


def worker_command(argv: Sequence[str], spec: ChildSpec) -> list[str]:
    """The parent's own command line with the child's settings last (click: the last wins)."""
    own = ["--processes", "1", "--worker-id", spec.worker_id, "--device", spec.device]
    own += ["--metrics-port", str(spec.metrics_port)]
    return [sys.executable, "-m", "worker", *argv, *own]


def _child_setup() -> None:
    """In the child before exec: its own process group (one Ctrl-C, through the parent), and
    SIGTERM when the parent dies, so a parent killed outright leaves no worker behind."""
    os.setpgid(0, 0)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    """One child process and its restart state."""

    spec: ChildSpec
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    # Monotonic time at which to start it (again); None while it runs or must wait.
    start_at: float | None = None
    failures: int = 0
    # The signals forwarded to it. A SIGTERM goes once: Celery's warm shutdown is under way
    # after the first, and one that arrives while Celery's handler runs deadlocks the child in
    # that handler (found with a benchmark that stopped its workers twice). A second SIGINT
    # goes too: it is Celery's cold shutdown.
    told: set[int] = field(default_factory=set)

    def start(self, command: list[str]) -> None:
        env = {**os.environ, **self.spec.env}
        self.proc = subprocess.Popen(command, env=env, preexec_fn=_child_setup)
        self.started_at = time.monotonic()
        self.start_at = None
        log.info("worker %s started (pid %d, %s)", self.spec.worker_id, self.proc.pid,
                 self.spec.device)  # fmt: skip

    def exited(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def signalled(self) -> bool:
        return bool(self.told)

    def signal(self, signum: int) -> None:
        if not self.running() or (signum == signal.SIGTERM and signum in self.told):
            return
        assert self.proc is not None
        self.told.add(signum)
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signum)

    def schedule_restart(self, now: float) -> float:
        """Back off after each quick death; a child that ran a while starts over."""
        self.failures = 1 if now - self.started_at > STABLE_AFTER_S else self.failures + 1
        delay = min(RESTART_BACKOFF_MAX_S, RESTART_BACKOFF_S * 2 ** (self.failures - 1))
        self.proc = None
        self.start_at = now + delay
        return delay


# -- the supervisor --------------------------------------------------------------------------


class Supervisor:
    """Starts the children (the first alone until ``ready``), restarts the dead, forwards
    SIGTERM and SIGINT, and waits (bounded) for them all to stop."""

    def __init__(
        self,
        specs: Sequence[ChildSpec],
        command: Callable[[ChildSpec], list[str]],
        ready: Callable[[ChildSpec], bool],
        grace_s: float = SHUTDOWN_GRACE_S,
    ) -> None:
        self.children = [Child(spec) for spec in specs]
        self.command = command
        self.ready = ready
        self.grace_s = grace_s
        self.stopping = False
        self._first_ready = False

    def run(self) -> int:
        """Serve until a signal (exit 0 if every child drained cleanly) or a fatal child exit."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.children[0].start_at = time.monotonic()
            fatal = self._watch()
            return fatal if fatal is not None else self._stop(signal.SIGTERM)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping = True
        for child in self.children:
            child.signal(signum)

    def _watch(self) -> int | None:
        while not self.stopping:
            now = time.monotonic()
            for child in self.children:
                fatal = self._tend(child, now)
                if fatal is not None:
                    self._stop(signal.SIGTERM)
                    return fatal
            self._release_rest()
            time.sleep(POLL_S)
        return None

    def _tend(self, child: Child, now: float) -> int | None:
        """Start a child that is due, or note one that died. Returns a fatal exit code."""
        if child.start_at is not None and now >= child.start_at and not self.stopping:
            child.start(self.command(child.spec))
            return None
        code = child.exited()
        if code is None or self.stopping:
            return None
        if code in FATAL_EXIT_CODES:
            log.error("worker %s exited %d; stopping the others", child.spec.worker_id, code)
            return code
        delay = child.schedule_restart(now)
        log.warning("worker %s exited %d; restarting it in %.0f s",
                    child.spec.worker_id, code, delay)  # fmt: skip
        return None

    def _release_rest(self) -> None:
        """Once the first child is warm, start the others."""
        if self._first_ready or not self.children[0].running():
            return
        if self.ready(self.children[0].spec):
            self._first_ready = True
            for child in self.children[1:]:
                child.start_at = time.monotonic()

    def _stop(self, signum: int) -> int:
        """Signal every child not yet told (once each: a second SIGINT is Celery's cold
        shutdown), wait up to the grace period, SIGKILL what is left. Returns 0 when every
        child exited 0, else the first other code (128 + signal for a signalled one)."""
        self.stopping = True
        for child in self.children:
            if not child.signalled:
                child.signal(signum)
        deadline = time.monotonic() + self.grace_s
        codes = [_wait(child, deadline) for child in self.children if child.proc is not None]
        return next((c for c in codes if c != 0), 0)


def _wait(child: Child, deadline: float) -> int:
    assert child.proc is not None
    try:
        code = child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        log.error("worker %s still running after the grace period; killing it",
                  child.spec.worker_id)  # fmt: skip
        child.proc.kill()
        code = child.proc.wait()
    return 128 - code if code < 0 else code


# -- wiring ----------------------------------------------------------------------------------


def heartbeat_ready(redis_url: str, model: str) -> Callable[[ChildSpec], bool]:
    """A child is warm once its heartbeat key exists (as for any worker)."""
    import redis

    from contract import keys
    from contract.connection import connect

    client = connect(redis_url)

    def ready(spec: ChildSpec) -> bool:
        try:
            return bool(client.exists(keys.heartbeat_key(model, spec.worker_id)))
        except redis.RedisError:
            return False

    return ready


def serve(
    argv: Sequence[str],
    devices: Sequence[str],
    worker_id: str,
    metrics_port: int,
    ready: Callable[[ChildSpec], bool],
) -> int:
    """Run one child per device until stopped; the exit status for ``python -m worker``."""
    specs = child_specs(devices, worker_id, metrics_port, cpu_count())
    log.info("%d worker processes on %s", len(specs), ", ".join(sorted(set(devices))))
    return Supervisor(specs, lambda spec: worker_command(argv, spec), ready).run()
