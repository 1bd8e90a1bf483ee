"""The results: one JSON document per run, and the markdown table for the README.

``python -m bench.report FILE.json ...`` prints the tables of runs saved earlier (the device
script uses it to merge the runs it made).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

HEADER = (
    "| model | images | (a) seed loop img/s | (b) in-process img/s | forward only img/s "
    "| (c) end-to-end img/s | c/a | c/b | c/b by CPU | latency p50 / p99 ms "
    "| overhead p50 / p99 ms |"
)
NOTE = (
    "c/b by CPU: CPU seconds per image in-process over those of the workers and Redis end to "
    "end, i.e. c/b when both saturate the same cores; unlike the rates, it ignores other load."
)
HOSTPATH_HEADER = (
    "| host path: workers | jobs | jobs/s | worker CPU ms/job | Redis CPU ms/job "
    "| producer CPU ms/job | Redis bytes/job | MEMORY USAGE/record |"
)
# Shown where a stage did not run.
MISSING = "-"
ALIGN = "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"


def record(result: object, *properties: str) -> dict[str, Any]:
    """A result dataclass as a JSON object, with the derived figures it computes."""
    data = dataclasses.asdict(result)  # type: ignore[call-overload]
    data.update({p: getattr(result, p) for p in properties})
    return data


def save(report: dict[str, Any], path: Path) -> None:
    """Written whole after every stage, so a run cut short still leaves what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def _num(value: float | None, digits: int = 1) -> str:
    return MISSING if value is None else f"{value:,.{digits}f}"


def _pair(a: float | None, b: float | None) -> str:
    return MISSING if a is None or b is None else f"{a:,.1f} / {b:,.1f}"


def _headline(run: dict[str, Any]) -> dict[str, Any] | None:
    wanted = run.get("headline_workers")
    return next((e for e in run.get("e2e", []) if e["workers"] == wanted), None)


def _size(spec: dict[str, Any]) -> str:
    if "min_side" in spec:  # a mixed-size set
        return f"{spec['min_side']}-{spec['max_side']} px"
    return f"{spec.get('width', '?')}x{spec.get('height', '?')}"


def _row(run: dict[str, Any], sets: dict[str, Any]) -> str:
    e2e, lat = _headline(run), run.get("latency") or {}
    spec = sets.get(run["images"], {})
    images = f"{run['images']} {_size(spec)}"
    e2e_text = MISSING if e2e is None else f"{_num(e2e['img_s'])} ({e2e['workers']}w)"
    ratios = run.get("ratios", {})
    cells = [
        run["model"],
        images,
        _num((run.get("seed") or {}).get("img_s")),
        _num((run.get("ceiling") or {}).get("img_s")),
        _num((run.get("forward") or {}).get("img_s")),
        e2e_text,
        _num(ratios.get("e2e_over_seed"), 2),
        _num(ratios.get("e2e_over_ceiling"), 2),
        _num(ratios.get("e2e_over_ceiling_cpu"), 2),
        _pair(lat.get("p50_ms"), lat.get("p99_ms")),
        _pair(lat.get("overhead_p50_ms"), lat.get("overhead_p99_ms")),
    ]
    return "| " + " | ".join(cells) + " |"


def _scale_out(runs: list[dict[str, Any]]) -> list[str]:
    counts = sorted({e["workers"] for r in runs for e in r.get("e2e", [])})
    if len(counts) < 2:
        return []
    lines = [
        "",
        "| model | images | " + " | ".join(f"{c} worker{'s' * (c > 1)}" for c in counts) + " |",
        "|---|---|" + "---:|" * len(counts),
    ]
    for run in runs:
        by_count = {e["workers"]: e["img_s"] for e in run.get("e2e", [])}
        cells = [_num(by_count.get(c)) for c in counts]
        lines.append(f"| {run['model']} | {run['images']} | " + " | ".join(cells) + " |")
    return lines


def _context(report: dict[str, Any]) -> list[str]:
    m, o = report["machine"], report["options"]
    device = m.get("device_name") or m["device"]
    lines = [
        f"**{report['label']}**: {device}; {m['cpu_count']}-core {m['machine']} "
        f"({m.get('cpu_model') or 'CPU'}); torch {m['torch']}, torchvision {m['torchvision']}.",
        f"Worker options: device {o['device']}, precision {o['dtype']}, batch {o['batch_size']}, "
        f"max wait {o['max_wait_ms']} ms, io-threads {o['io_threads']}, concurrency "
        f"{o['concurrency']}, channels-last {o['channels_last']}, compile {o['compile']}, "
        f"torch threads {o['torch_threads_effective']}, flush denormals "
        f"{o.get('flush_denormal')}. Random weights (throughput only).",
    ]
    if report.get("submit"):
        s = report["submit"]
        lines.append(
            f"Bulk submission (one producer process, `Client.submit_many`): "
            f"{_num(s['jobs_s'], 0)} jobs/s ({s['jobs']:,} jobs in {s['seconds']:.2f} s)."
        )
    return lines


def _hostpath(rows: list[dict[str, Any]] | None) -> list[str]:
    """The per-job cost table of issue 10: null model, small JPEGs (bench/hostpath.py)."""
    if not rows:
        return []
    lines = ["", HOSTPATH_HEADER, "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [
            _workers_and_shards(r),
            f"{r['jobs']:,}",
            _num(r["jobs_s"], 0),
            _num(r["worker_cpu_ms"], 3),
            _redis_cpu(r),
            _num(r["producer_cpu_ms"], 3),
            _num(r["redis_bytes_per_job"], 0),
            _num(r["record_bytes"], 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _workers_and_shards(row: dict[str, Any]) -> str:
    shards = row.get("shards", 1)
    text = str(row["workers"]) if shards == 1 else f"{row['workers']} ({shards} Redis)"
    path = row.get("path", "cpu")
    return text if path == "cpu" else f"{text} ({path})"


def _redis_cpu(row: dict[str, Any]) -> str:
    """All servers' CPU per job; with shards, each server's too (the broker first)."""
    total = _num(row["redis_cpu_ms"], 3)
    each = row.get("redis_cpu_ms_per_server") or []
    return total if len(each) < 2 else f"{total} ({', '.join(_num(e, 3) for e in each)})"


def _peer(rows: list[dict[str, Any]] | None) -> list[str]:
    """LitServe beside this service: mobilenet_v3_large on ImageNet-size JPEGs (bench/peer.py)."""
    if not rows:
        return []
    lines = ["", "| peer comparison: layout | img/s (best) | repeats |", "|---|---:|---|"]
    for r in rows:
        repeats = ", ".join(f"{v:.1f}" for v in r["repeats"])
        lines.append(f"| {r['layout']} | {_num(r['img_s'])} | {repeats} |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    sets = report.get("image_sets", {})
    runs = report.get("runs", [])
    lines = list(_context(report))
    if runs:
        lines += ["", HEADER, ALIGN, *(_row(r, sets) for r in runs), *_scale_out(runs), "", NOTE]
    lines += _hostpath(report.get("hostpath"))
    lines += _peer(report.get("peer"))
    return "\n".join(lines) + "\n"


def main(paths: list[str]) -> int:
    for path in paths:
        print(markdown(json.loads(Path(path).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
