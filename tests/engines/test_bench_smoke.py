"""`python -m bench.engines` runs and prints one parseable JSON line per workload.

Behaviour only (the lines, their fields, the exit code), never speed: benchmarks are
measurements, not timed tests.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import require_engine

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench.engines", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_bench_on_memory_prints_json_lines(tmp_path):
    proc = run_bench("--engines", "memory", "--n", "2000", "--reads", "500", "--scans", "20", "--sync-seconds", "0.2",
                     "--no-reference", "--dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    by_workload = {line["workload"]: line for line in lines}
    assert set(by_workload) == {"fill", "read_hit", "read_miss", "scan100", "overwrite", "sync_write_1t", "sync_write_8t"}
    for line in lines:
        assert line["engine"] == "memory"
        assert {"ops", "seconds", "ops_per_s", "p50_us", "p99_us"} <= set(line)
        assert line["ops"] > 0 and line["seconds"] > 0
        assert line["p50_us"] <= line["p99_us"]
    assert by_workload["fill"]["ops"] == 2000
    assert by_workload["read_hit"]["ops"] == 500
    assert by_workload["scan100"]["ops"] == 20
    assert 0 < by_workload["scan100"]["keys_scanned"] <= 20 * 100
    assert by_workload["sync_write_8t"]["threads"] == 8


def test_bench_refuses_unknown_engine():
    proc = run_bench("--engines", "memory,teapot", "--no-reference")
    assert proc.returncode != 0
    assert "teapot" in proc.stderr


@pytest.mark.parametrize("kind", ["hash", "lsm"])
def test_bench_on_persistent_engine_reports_space_and_reopen(kind, tmp_path):
    require_engine(kind)
    proc = run_bench("--engines", kind, "--n", "3000", "--reads", "300", "--scans", "10", "--sync-seconds", "0.2",
                     "--no-reference", "--dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = {line["workload"]: line for line in map(json.loads, proc.stdout.splitlines())}
    assert lines["space"]["live_bytes"] == 3000 * 116
    assert lines["space"]["disk_bytes"] > 0
    assert lines["reopen"]["open_seconds"] >= 0


def test_bench_bitcask_sketch_reference_gives_ratios(tmp_path):
    proc = run_bench("--engines", "memory", "--n", "2000", "--reads", "500", "--scans", "20", "--sync-seconds", "0.2",
                     "--reference", "bitcask-sketch", "--dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    sketch = {line["workload"]: line for line in lines if line["engine"] == "bitcask-sketch"}
    # No key order, no durability: the sketch runs the four workloads it can do honestly.
    assert set(sketch) == {"fill", "read_hit", "read_miss", "overwrite"}
    assert sketch["read_hit"]["ops"] == 500
    memory = {line["workload"]: line for line in lines if line["engine"] == "memory"}
    for workload in ("fill", "read_hit", "read_miss", "overwrite"):
        expected = memory[workload]["ops_per_s"] / sketch[workload]["ops_per_s"]
        assert abs(memory[workload]["ratio_vs_bitcask_sketch"] - expected) <= 1e-3 * expected + 1e-4
    assert "ratio_vs_bitcask_sketch" not in memory["scan100"]
    assert not os.listdir(tmp_path)  # the sketch's data file is removed


def test_bench_refuses_unknown_reference():
    proc = run_bench("--engines", "memory", "--reference", "bitcask-sketch,teapot")
    assert proc.returncode != 0
    assert "teapot" in proc.stderr
