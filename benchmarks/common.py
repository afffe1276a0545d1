"""Shared by the benchmark scripts: machine facts and appending results to BENCHMARKS.md."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "BENCHMARKS.md"


def machine() -> str:
    memory_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal:"))
    return f"{os.cpu_count()} cores, {memory_kib / 2**20:.0f} GiB, Python {platform.python_version()}"


def commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return (result.stdout.strip() or "unknown") + ("+dirty" if dirty else "")


def record(title: str, lines: list[str], write: bool = True) -> str:
    """Print the figures and append them, with date, machine and commit, to BENCHMARKS.md."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = "\n".join([f"### {title}", "", f"{stamp} · {machine()} · commit {commit()}", "",
                       *[f"- {line}" for line in lines], ""])
    print(block)
    if write:
        if not RESULTS.exists():
            RESULTS.write_text("# Benchmarks\n\nFigures recorded by the scripts in `benchmarks/` "
                               "(newest last). They are measurements, not pass/fail tests.\n\n")
        with RESULTS.open("a") as out:
            out.write("\n" + block)
    return block
