"""The benchmark's ``--quick`` mode runs end to end and measures every target of issue 3."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Every figure the benchmark must report (BENCHMARKS.md is written from these).
TARGETS = [
    "push_time",
    "push_vs_transport_floor",
    "fl4health_push_time",
    "push_vs_fl4health",
    "selection_memory",
    "payload_10pct",
    "payload_1pct",
    "initial_model_reuse",
    "exact_k",
    "exact_k_time",
    "any_size_push",
    "any_size_pull",
    "any_size_server_memory",
    "concurrency_1",
    "concurrency_2",
    "concurrency_4",
    "concurrency_8",
    "pull_vs_copy",
]


def test_quick_benchmark_measures_every_target(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    document = json.loads(out.read_text())
    targets = document["targets"]
    for name in TARGETS:
        row = targets.get(name)
        assert row is not None, f"{name} missing from the JSON"
        measured = row["measured"]
        assert isinstance(measured, int | float), (name, row)
        assert math.isfinite(measured), (name, row)
        assert row["verdict"] in ("PASS", "MISS", "INFO"), (name, row)
        assert row["title"] in proc.stdout, f"{name} is not in the printed table"
    # What holds at any size: the same selection as FL4Health, exactly k with exact_k, every
    # concurrent client succeeding with the single client's answer.
    assert document["figures"]["push"]["fl4health_agrees_with_paramsel"] is True
    assert targets["exact_k"]["verdict"] == "PASS", targets["exact_k"]
    for level in (1, 2, 4, 8):
        assert targets[f"concurrency_{level}"]["verdict"] == "PASS", targets[f"concurrency_{level}"]
    machine = document["machine"]
    for key in ("platform", "cpu_count", "memory_total_bytes", "torch", "grpcio", "date"):
        assert machine[key], key
