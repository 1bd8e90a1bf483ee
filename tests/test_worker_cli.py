"""The worker's flags: defaults from worker.settings, each settable from the environment."""

from __future__ import annotations

from dataclasses import replace

import click
import pytest
from click.testing import CliRunner

from worker.cli import _settings, cpu_thread_env, main
from worker.settings import Settings


def test_flags_left_out_give_the_settings_defaults() -> None:
    ctx = main.make_context("worker", ["--model", "m", "--device", "cpu"])
    built = _settings(ctx.params)

    defaults = Settings(model="m", worker_id=built.worker_id, allowed_roots=built.allowed_roots)
    assert built == replace(defaults, device="cpu")


def test_every_flag_has_an_environment_variable_that_help_names() -> None:
    options = [p for p in main.params if isinstance(p, click.Option) and p.name != "help"]
    missing = [o.name for o in options if not (o.envvar and o.show_envvar)]
    assert missing == []
    shown = CliRunner().invoke(main, ["--help"], terminal_width=1000).output
    assert all(f"env var: {o.envvar}" in shown for o in options)


def test_an_environment_variable_sets_its_flag(monkeypatch) -> None:
    monkeypatch.setenv("IMGCLS_CROP", "32")
    ctx = main.make_context("worker", ["--model", "m", "--device", "cpu"])
    assert _settings(ctx.params).preprocess.crop == 32


def test_host_threads_default_to_the_cores_and_refuse_zero(monkeypatch) -> None:
    monkeypatch.setenv("IMGCLS_HOST_THREADS", "3")
    ctx = main.make_context("worker", ["--model", "m", "--device", "cpu"])
    assert _settings(ctx.params).host_threads == 3
    assert Settings(model="m").host_threads is None  # setup() takes torch's thread count
    with pytest.raises(ValueError, match="--host-threads must be >= 1"):
        Settings(model="m", host_threads=0).validate()


def test_openmp_threads_sleep_between_batches_unless_the_operator_chose() -> None:
    assert cpu_thread_env({}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert cpu_thread_env({"OMP_WAIT_POLICY": "ACTIVE"}) == {}


def test_the_store_wait_is_a_flag_and_refuses_a_negative(monkeypatch) -> None:
    monkeypatch.setenv("IMGCLS_STORE_WAIT_MS", "2.5")
    ctx = main.make_context("worker", ["--model", "m", "--device", "cpu"])
    assert _settings(ctx.params).store_wait_ms == 2.5
    with pytest.raises(ValueError, match="--store-wait-ms must be >= 0"):
        Settings(model="m", store_wait_ms=-1).validate()
