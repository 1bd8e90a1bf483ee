"""The benchmark's smoke run: every stage runs and reports sane numbers (no timing thresholds)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.latency import percentile
from bench.report import markdown

ROOT = Path(__file__).resolve().parent.parent
STAGE_RATES = ("seed", "ceiling", "forward")


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _run_quick(tmp_path: Path, torch_home: str) -> tuple[dict[str, Any], str]:
    out = tmp_path / "quick.json"
    env = {**os.environ, "TORCH_HOME": torch_home, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "bench", "--quick", "--out", str(out)]
    cmd += ["--log-dir", str(tmp_path / "logs"), "--image-dir", str(tmp_path / "images")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(out.read_text()), proc.stdout


def _check_run(run: dict[str, Any]) -> None:
    name = f"{run['model']} {run['images']}"
    for stage in STAGE_RATES:
        assert _positive(run[stage]["img_s"]), (name, stage, run[stage])
    assert _positive(run["batch1_ms"]), name
    for field in ("p50_ms", "p99_ms", "server_p50_ms", "overhead_p50_ms", "overhead_p99_ms"):
        assert math.isfinite(run["latency"][field]), (name, field)
    assert _positive(run["latency"]["p50_ms"]) and run["latency"]["samples"] >= 2
    assert run["e2e"], name
    for e2e in run["e2e"]:
        assert e2e["all_done"] and e2e["done"] == e2e["jobs"] > 0, (name, e2e)
        assert e2e["failed"] == 0 and e2e["missing"] == 0, (name, e2e)
        assert _positive(e2e["img_s"]) and _positive(e2e["seconds"]), (name, e2e)
    assert _positive(run["ratios"]["e2e_over_seed"]), name
    assert _positive(run["ratios"]["e2e_over_ceiling"]), name


def test_quick_benchmark_measures_every_stage_and_every_job_ends_done(
    tmp_path: Path, torch_home: str
) -> None:
    report, stdout = _run_quick(tmp_path, torch_home)
    assert set(report["image_sets"]) == {"imagenet", "12mp"}
    assert all(s["mean_bytes"] > 0 for s in report["image_sets"].values())
    assert _positive(report["submit"]["jobs_s"]) and report["submit"]["jobs"] > 0
    assert report["machine"]["cpu_count"] >= 1 and report["options"]["torch_threads_effective"]
    assert len(report["runs"]) == 2
    for run in report["runs"]:
        _check_run(run)
    _check_hostpath(report["hostpath"])
    assert stdout.count("| mobilenet_v3_small |") == 2
    assert markdown(report) in stdout


HOSTPATH_CPU = ("worker_cpu_ms", "redis_cpu_ms", "producer_cpu_ms")


def _check_hostpath(rows: list[dict[str, Any]]) -> None:
    assert rows and rows[0]["workers"] == 1
    for row in rows:
        assert row["done"] == row["jobs"] > 0, row
        assert _positive(row["jobs_s"]) and _positive(row["seconds"]), row
        for field in HOSTPATH_CPU:
            value = row[field]
            assert isinstance(value, float) and math.isfinite(value) and value >= 0, (field, row)
        # used_memory moves by tens of KB with client buffers: a sign only over thousands of jobs.
        assert isinstance(row["redis_bytes_per_job"], float), row
        assert math.isfinite(row["redis_bytes_per_job"]), row
        assert _positive(row["record_bytes"]) and _positive(row["record_json_bytes"]), row
        assert row["record_bytes"] > row["record_json_bytes"], row
        scripts = row["commandstats"].get("evalsha") or row["commandstats"].get("eval")
        assert scripts and _positive(scripts["calls"]) and scripts["usec"] >= 0, row
        assert len(row["repeats"]["jobs_s"]) >= 1


def test_quick_host_path_reports_every_per_job_cost(tmp_path: Path) -> None:
    out = tmp_path / "hostpath.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "bench.hostpath", "--quick", "--out", str(out), "--shards", "2"]
    cmd += ["--device-stand-in", "--log-dir", str(tmp_path / "logs")]
    cmd += ["--image-dir", str(tmp_path / "images")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = json.loads(out.read_text())
    _check_hostpath(report["hostpath"])
    rows = report["hostpath"]
    assert [(r["shards"], len(r["redis_cpu_ms_per_server"]), r["path"]) for r in rows] == [
        (1, 1, "cpu"),
        (2, 2, "cpu"),
        (1, 1, "gpu-stand-in"),
    ]
    assert "| 1 (2 Redis) |" in proc.stdout and "| 1 (gpu-stand-in) |" in proc.stdout
    assert report["runs"] == [] and report["submit"] is None
    assert "| host path: workers |" in proc.stdout


def test_percentile_interpolates_between_ranks_like_numpy() -> None:
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 5.0
    assert math.isclose(percentile(values, 99), 4.96)


def test_results_go_to_the_working_directory_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench.__main__ import build_config, parser

    monkeypatch.chdir(tmp_path)

    cfg = build_config(parser().parse_args(["--quick", "--label", "here"]))

    assert cfg.out == tmp_path / "bench-results" / "here.json"


def test_store_cost_measures_each_step_of_a_job(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "bench.store_cost", "--jobs", "128", "--repeat", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = json.loads(proc.stdout)
    steps = ("create", "claim", "finish", "read")
    assert list(report["us_per_job"]) == list(steps)
    for step in steps:
        value = report["us_per_job"][step]
        assert isinstance(value, float) and math.isfinite(value) and value >= 0, report
    assert "set" in report["commands_per_job"]["create"]
    assert "evalsha" in report["commands_per_job"]["finish"]
    assert 0 < report["memory_usage_finished_record"] <= 300


def test_host_threads_measures_the_load_per_image_at_each_thread_count(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "bench.host_threads", "--images", "6", "--rounds", "2"]
    cmd += ["--threads", "1,3", "--out", str(tmp_path / "threads.json")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = json.loads((tmp_path / "threads.json").read_text())
    assert [r["threads"] for r in report["runs"]] == [1, 3]
    for run in report["runs"]:
        assert run["cpu_us_per_image"] > 0 and run["wall_us_per_image"] > 0, report
