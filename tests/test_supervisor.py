"""Several worker processes per host (worker/supervisor.py): the layout ``--processes auto``
picks, and the parent's failure handling, with real child processes, a real redis-server and
the fault tests' tiny model."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from contract import keys
from producer.client import Client
from tests.faults_support import (
    CHUNK,
    MODEL,
    SETTLE_S,
    ImageServer,
    Workers,
    account,
    held_layout,
    model_args_fixture,  # noqa: F401 (the model_args fixture)
    server_fixture,  # noqa: F401 (the server fixture, shared by the fault tests)
    settle,
    statuses,
    stuck_in_flight,
    wait_until,
)
from tests.support import WorkerProcess, write_images
from worker import settings as worker_defaults
from worker import supervisor
from worker.cli import main
from worker.supervisor import ChildSpec, Supervisor

# -- the layout ------------------------------------------------------------------------------


def test_auto_on_a_cpu_host_is_one_process_per_core() -> None:
    assert supervisor.plan_devices(None, "auto", 2, gpus=0, cores=4) == ["cpu"] * 4


def test_auto_on_a_gpu_host_is_n_processes_per_gpu_spread_over_the_gpus() -> None:
    devices = supervisor.plan_devices(None, "auto", 2, gpus=3, cores=16)
    assert devices == ["cuda:0", "cuda:1", "cuda:2"] * 2


def test_a_named_gpu_keeps_every_process() -> None:
    assert supervisor.plan_devices(None, "cuda:1", 3, gpus=2, cores=16) == ["cuda:1"] * 3


def test_an_explicit_count_wins_and_one_means_no_supervisor() -> None:
    assert supervisor.plan_devices(3, "cpu", 2, gpus=0, cores=2) == ["cpu"] * 3
    assert supervisor.plan_devices(1, "auto", 2, gpus=4, cores=16) == ["cuda:0"]


def test_processes_must_be_auto_or_a_positive_count() -> None:
    assert supervisor.parse_processes("auto") is None
    assert supervisor.parse_processes("3") == 3
    for bad in ("0", "-1", "many"):
        with pytest.raises(ValueError):
            supervisor.parse_processes(bad)


def test_children_get_their_own_ids_ports_and_one_thread_per_core_share(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    specs = supervisor.child_specs(["cpu", "cpu"], "host-7", 9100, cores=2)
    assert [s.worker_id for s in specs] == ["host-7-0", "host-7-1"]
    assert [s.metrics_port for s in specs] == [9100, 9101]
    assert all(s.env == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} for s in specs)
    gpu = supervisor.child_specs(["cuda:0", "cuda:1"], "g", 0, cores=16)
    assert [s.metrics_port for s in gpu] == [0, 0] and all(s.env == {} for s in gpu)


def test_an_operator_set_thread_count_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    (spec,) = supervisor.child_specs(["cpu"], "h", 0, cores=8)
    assert spec.env == {"MKL_NUM_THREADS": "8"}


def test_a_child_runs_the_parents_command_with_its_own_settings_last() -> None:
    spec = ChildSpec(1, "h-1", "cuda:1", 9101)
    command = supervisor.worker_command(["--model", "m", "--processes", "auto"], spec)
    assert command[:3] == [sys.executable, "-m", "worker"]
    tail = command[3:]
    assert tail[:4] == ["--model", "m", "--processes", "auto"]
    assert tail[4:] == [
        "--processes", "1", "--worker-id", "h-1", "--device", "cuda:1", "--metrics-port", "9101",
    ]  # fmt: skip


# -- the parent's failure handling, with stand-in children -------------------------------------


def _stand_in(script: str, log: Path) -> Callable[[ChildSpec], list[str]]:
    """Children that run ``script`` (``LOG`` is a file each start appends its index to)."""

    def command(spec: ChildSpec) -> list[str]:
        prelude = f"import os, signal, sys, time\nLOG = {str(log)!r}\nINDEX = {spec.index}\n"
        prelude += "open(LOG, 'a').write(f'{INDEX}\\n')\n"
        return [sys.executable, "-c", prelude + script]

    return command


def _specs(count: int) -> list[ChildSpec]:
    return [ChildSpec(i, f"t-{i}", "cpu", 0) for i in range(count)]


def _starts(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


@pytest.mark.parametrize("code", [2, 3, 4])
def test_a_child_that_fails_at_start_up_stops_the_parent_with_its_code(
    code: int, tmp_path: Path
) -> None:
    log = tmp_path / "starts"
    command = _stand_in(f"sys.exit({code})", log)
    assert Supervisor(_specs(2), command, ready=lambda _: True, grace_s=10).run() == code
    assert len(_starts(log)) <= 2  # no restart: each child started at most once


def test_the_first_child_starts_alone_until_it_is_ready(tmp_path: Path) -> None:
    """A model that cannot load fails in one child, not in all of them at once."""
    log = tmp_path / "starts"
    command = _stand_in("sys.exit(2)", log)
    assert Supervisor(_specs(4), command, ready=lambda _: False, grace_s=10).run() == 2
    assert _starts(log) == ["0"]


def test_a_child_that_dies_is_restarted_and_sigterm_drains_them_all(tmp_path: Path) -> None:
    log = tmp_path / "starts"
    # Child 1 dies as a broken device does (exit 70) the first time; every child then serves
    # until SIGTERM, and exits 0.
    script = (
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
        "if INDEX == 1 and open(LOG).read().split().count('1') == 1: sys.exit(70)\n"
        "while True: time.sleep(0.05)\n"
    )
    parent = Supervisor(_specs(2), _stand_in(script, log), ready=lambda _: True, grace_s=10)

    def stop_once_restarted() -> None:
        wait_until(lambda: _starts(log).count("1") == 2, "child 1 restarted", timeout=30)
        os.kill(os.getpid(), signal.SIGTERM)  # the parent's handler forwards it

    threading.Thread(target=stop_once_restarted, daemon=True).start()
    assert parent.run() == 0
    assert sorted(_starts(log)) == ["0", "1", "1"]
    assert all(not child.running() for child in parent.children)


def test_a_second_sigterm_to_the_parent_is_not_forwarded(tmp_path: Path) -> None:
    # Celery's warm shutdown is under way after the first; a SIGTERM that arrives while its
    # handler runs deadlocks the child, which then outlives the parent.
    log, terms = tmp_path / "starts", tmp_path / "terms"
    script = (
        f"TERMS = {str(terms)!r}\n"
        "def on_term(*_):\n"
        "    open(TERMS, 'a').write(f'{INDEX}\\n')\n"
        "    time.sleep(1)\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, on_term)\n"
        "while True: time.sleep(0.05)\n"
    )
    parent = Supervisor(_specs(2), _stand_in(script, log), ready=lambda _: True, grace_s=10)

    def stop_twice() -> None:
        wait_until(lambda: len(_starts(log)) == 2, "both children started", timeout=30)
        time.sleep(0.5)  # their handlers are installed
        os.kill(os.getpid(), signal.SIGTERM)
        wait_until(terms.exists, "a child got the first SIGTERM", timeout=10)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_twice, daemon=True).start()
    assert parent.run() == 0
    assert sorted(terms.read_text().split()) == ["0", "1"]


# -- real workers ----------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    return write_images(tmp_path / "images", 200, width=48, height=48)


def _children(parent: WorkerProcess) -> dict[str, int]:
    """The parent's live children: worker ID → pid (from each child's command line)."""
    task = Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
    found = {}
    for pid in task.read_text().split():
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"--worker-id" not in args:  # a zombie not yet reaped
            continue
        last = len(args) - 1 - args[::-1].index(b"--worker-id")  # the child's own, last
        found[args[last + 1].decode()] = int(pid)
    return found


def _start_two(workers: Workers, client: redis.Redis, *args: str) -> WorkerProcess:
    """A parent with two child processes, returned once both children are warm."""
    parent = workers.start("--processes", "2", *args)
    ids = [f"{parent.worker_id}-{i}" for i in range(2)]
    wait_until(
        lambda: all(client.exists(keys.heartbeat_key(MODEL, w)) for w in ids),
        "2 warm children",
    )
    return parent


def _uris(images: list[Path], messages: int) -> list[str]:
    return [str(images[n % len(images)]) for n in range(messages * CHUNK)]


@pytest.mark.slow
def test_two_processes_both_take_jobs_and_finish_them_all(
    redis_url: str, redis_client: redis.Redis, model_args, images, tmp_path, torch_home
) -> None:
    producer = Client.from_url(redis_url)
    with Workers(redis_url, tmp_path, torch_home, model_args) as workers:
        parent = _start_two(workers, redis_client)
        ids = [j.id for j in producer.submit_many(_uris(images, 20), model=MODEL)]
        records = settle(producer, ids)
    counted = account("two-processes", redis_client, records)
    assert counted.done == counted.submitted and counted.written_done == counted.done
    assert {r.worker for r in records if r} == {f"{parent.worker_id}-{i}" for i in range(2)}


@pytest.mark.slow
def test_a_child_killed_mid_run_is_restarted_and_no_job_is_lost(
    redis_url: str,
    redis_client: redis.Redis,
    model_args,
    server: ImageServer,
    images,
    tmp_path,
    torch_home,
) -> None:
    producer = Client.from_url(redis_url)
    with Workers(redis_url, tmp_path, torch_home, model_args) as workers:
        # One message per child at a time: with two held messages, each child holds one.
        parent = _start_two(workers, redis_client, "--concurrency", "1")
        uris = held_layout(server, images, 2) + _uris(images, 2)
        ids = [j.id for j in producer.submit_many(uris, model=MODEL)]
        stuck_in_flight(server, producer, ids, held=2)

        victim = f"{parent.worker_id}-1"
        killed = _children(parent)[victim]
        os.kill(killed, signal.SIGKILL)
        wait_until(lambda: _children(parent).get(victim, killed) != killed, "a new child 1")
        server.release()
        records = settle(producer, ids)
        assert parent.proc is not None and parent.proc.poll() is None  # the parent serves on
    counted = account("child-killed", redis_client, records)
    assert counted.lost == 0 and counted.failed == 0
    assert counted.written_done == counted.done == counted.submitted  # each stored once
    assert counted.redelivered >= 1  # the killed child's held job went back and was retried
    assert "exited -9; restarting" in parent.log()


@pytest.mark.slow
def test_sigterm_to_the_parent_drains_every_child_and_loses_nothing(
    redis_url: str, redis_client: redis.Redis, model_args, images, tmp_path, torch_home
) -> None:
    producer = Client.from_url(redis_url)
    with Workers(redis_url, tmp_path, torch_home, model_args) as workers:
        parent = _start_two(workers, redis_client)
        children = _children(parent)
        ids = [j.id for j in producer.submit_many(_uris(images, 30), model=MODEL)]
        wait_until(lambda: statuses(producer, ids).get("done", 0) >= CHUNK, "a message done")

        assert parent.terminate(timeout=SETTLE_S) == 0  # every child drained and exited 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in children.values())
        workers.start("--processes", "1")  # the rest of the queue
        records = settle(producer, ids)
    counted = account("parent-sigterm", redis_client, records)
    assert counted.lost == 0 and counted.failed == 0
    assert counted.written_done == counted.done == counted.submitted


def test_a_model_that_cannot_load_exits_2_with_one_line_and_no_restart(
    redis_url: str, tmp_path: Path, torch_home: str
) -> None:
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a TorchScript file")
    args = ["--model-file", str(bad), "--device", "cpu", "--processes", "3"]
    worker = WorkerProcess(redis_url, MODEL, args, tmp_path, env={"TORCH_HOME": torch_home})
    worker.start(wait=False)
    assert worker.wait_exit(timeout=SETTLE_S) == 2
    assert worker.log().count("worker not started:") == 1
    assert "Traceback" not in worker.log()


def test_processes_defaults_to_auto_and_the_cli_refuses_a_bad_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("IMGCLS_PROCESSES", raising=False)  # the suite's own setting
    ctx = main.make_context("worker", ["--model", "m"])
    assert ctx.params["processes"] is None
    assert ctx.params["processes_per_gpu"] == worker_defaults.PROCESSES_PER_GPU
    refused = CliRunner().invoke(main, ["--model", "m", "--processes", "0"])
    assert refused.exit_code == 2 and "auto or a count" in refused.output
