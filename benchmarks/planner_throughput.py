"""Planner throughput: placements per second over 1,000 hosts (pure function, no API).

Each placement runs every filter over every host of the zone and reserves in the ledger, as the
controller does; the guests are small enough that all of them fit. Target: >= 2,000 placements/s.

    .venv/bin/python benchmarks/planner_throughput.py [--hosts 1000] [--placements 5000] [--no-record]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import record  # noqa: E402
from controllers.api.v1alpha1.zone import AllocationAlgorithm  # noqa: E402
from controllers.planner import HostCandidate, Inventory, Ledger, PoolCandidate, Request, plan  # noqa: E402


def world(hosts: int) -> tuple[list[HostCandidate], list[PoolCandidate]]:
    candidates = [HostCandidate(f"h{i:04d}", "z1", f"p{i // 100}", f"c{i // 20}", "Simulator",
                                frozenset({"ssd"} if i % 2 else set()), 64, 262144) for i in range(hosts)]
    pools = [PoolCandidate(f"h{i:04d}-local", "Host", f"h{i:04d}", frozenset(), True, frozenset({f"h{i:04d}"}),
                           2**40, 0, True) for i in range(hosts)]
    return candidates, pools


def run(hosts: int, placements: int, algorithm: AllocationAlgorithm) -> float:
    inventory = Inventory(*world(hosts))
    ledger = Ledger()
    started = time.perf_counter()
    for i in range(placements):
        request = Request(key=f"ns{i % 50}/vm{i}", owner=f"ns{i % 50}", zone="z1", cpu=1, memory_mib=512,
                          hypervisor="Simulator", host_tags=frozenset({"ssd"}) if i % 3 == 0 else frozenset(),
                          storage_type="local", disk_bytes=2**30)
        decision = plan(request, inventory, ledger, algorithm)
        assert decision.ok, decision.message
        ledger.reserve(request.key, decision.host, 1, 512, request.owner)
    return placements / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--placements", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    lines = []
    for algorithm in AllocationAlgorithm:
        rates = [run(args.hosts, args.placements, algorithm) for _ in range(args.repeat)]
        lines.append(f"{algorithm.value}: median {statistics.median(rates):,.0f} placements/s over {args.hosts} hosts "
                     f"(runs: {', '.join(f'{r:,.0f}' for r in rates)}; target >= 2,000/s)")
    record("Planner throughput", lines, write=not args.no_record)


if __name__ == "__main__":
    main()
