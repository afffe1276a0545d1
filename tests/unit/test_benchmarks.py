"""The benchmark scripts run (their figures are recorded in BENCHMARKS.md, not asserted here)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_planner_benchmark_runs():
    result = subprocess.run([sys.executable, "benchmarks/planner_throughput.py", "--hosts", "20", "--placements",
                             "50", "--repeat", "1", "--no-record"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "placements/s" in result.stdout
