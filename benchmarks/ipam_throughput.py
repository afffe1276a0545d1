"""IPAM throughput: allocations/s, release/reallocate cost and rebuild of ``controllers.ipam`` pools (pure, no API).

* /24: fill a network's pool (gateway reserved) from empty to exhausted, many times over: allocations/s.
* /16: fill one pool of 65,533 addresses completely, timing every block of 4,096 allocations: a cost per
  allocation that grows with the fill level means ``Pool._first_free`` rescans the used addresses (quadratic
  fill). A time budget stops a fill that would take too long; the rest is extrapolated from the blocks done.
* churn: on the full pool, release a random owner and allocate for a new one (a guest replaced): the cost of
  finding the one free address among the used ones.
* rebuild: a controller restart records what 10,000 owners' objects say (``Pool.record``) into a fresh /16
  pool, then makes one more allocation.

    .venv/bin/python -m benchmarks.ipam_throughput [--budget 60] [--no-write]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import record  # noqa: E402
from controllers.ipam import AddressPool, Subnet  # noqa: E402

BLOCK = 4096
SHARED = "machine shared with other engineers' test runs"


def fill_small(repeat: int) -> list[float]:
    """Allocations/s filling a /24 from empty to exhausted, per run."""
    rates = []
    for run in range(repeat):
        pool = Subnet("10.1.1.0/24", gateway="10.1.1.1").pool()
        started = time.perf_counter()
        for i in range(pool.size):
            pool.allocate(f"nic-{run}-{i}")
        rates.append(pool.size / (time.perf_counter() - started))
    return rates


def fill_large(pool: AddressPool, budget: float) -> tuple[list[float], float, bool]:
    """Fill ``pool``; (seconds per block of BLOCK allocations, total seconds, whether it got full)."""
    blocks: list[float] = []
    started = time.perf_counter()
    i = 0
    while pool.used < pool.size:
        block_start = time.perf_counter()
        for _ in range(min(BLOCK, pool.size - pool.used)):
            pool.allocate(f"nic-{i}")
            i += 1
        blocks.append(time.perf_counter() - block_start)
        if time.perf_counter() - started > budget and pool.used < pool.size:
            return blocks, time.perf_counter() - started, False
    return blocks, time.perf_counter() - started, True


def churn(pool: AddressPool, operations: int, seed: int = 1) -> float:
    """Seconds per release + allocate pair on ``pool`` (full: the new owner gets the released address)."""
    rng = random.Random(seed)
    owners = list(pool.owners())
    started = time.perf_counter()
    for n in range(operations):
        victim = owners.pop(rng.randrange(len(owners)))
        freed = pool.release(victim)
        new = f"churn-{n}"
        got = pool.allocate(new)
        assert pool.used < pool.size or got == freed, (got, freed)
        owners.append(new)
    return (time.perf_counter() - started) / operations


def rebuild(owners: int, seed: int = 2) -> tuple[float, float]:
    """(seconds to record ``owners`` scattered over a fresh /16, seconds for the next allocation)."""
    rng = random.Random(seed)
    subnet = Subnet("10.64.0.0/16", gateway="10.64.0.1")
    values = rng.sample(range(int(subnet.pool().network.network_address) + 2,
                              int(subnet.pool().network.broadcast_address)), owners)
    records = [(f"ns/net/nic-{i}", value) for i, value in enumerate(values)]
    started = time.perf_counter()
    pool = subnet.pool()
    for owner, value in records:
        assert pool.record(owner, value) is None
    recorded = time.perf_counter() - started
    started = time.perf_counter()
    pool.allocate("after-rebuild")
    return recorded, time.perf_counter() - started


def dense_rebuild(owners: int) -> float:
    """Seconds for the first allocation after recording ``owners`` packed from the bottom of a /16 (the
    worst case for a scan from the start: every recorded address lies before the first free one)."""
    pool = Subnet("10.65.0.0/16", gateway="10.65.0.1").pool()
    first = pool.ranges[0][0]
    for i in range(owners):
        pool.record(f"nic-{i}", first + 1 + i)
    started = time.perf_counter()
    pool.allocate("next")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200, help="/24 fills")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds allowed for the /16 fill")
    parser.add_argument("--churn", type=int, default=5000, help="release/reallocate pairs on the full /16")
    parser.add_argument("--owners", type=int, default=10000, help="owners recorded by the rebuild")
    parser.add_argument("--no-write", "--no-record", dest="no_write", action="store_true",
                        help="print only, do not append to BENCHMARKS.md")
    args = parser.parse_args()
    lines = []

    rates = fill_small(args.repeat)
    lines.append(f"/24 fill (253 addresses, gateway reserved): median {statistics.median(rates):,.0f} allocations/s "
                 f"over {args.repeat} fills (min {min(rates):,.0f}, max {max(rates):,.0f})")

    pool = Subnet("10.32.0.0/16", gateway="10.32.0.1").pool()
    blocks, seconds, full = fill_large(pool, args.budget)
    first, last = BLOCK / blocks[0], BLOCK / blocks[-1] if len(blocks) > 1 else BLOCK / blocks[0]
    growth = blocks[-1] / blocks[0] if blocks[0] else float("nan")
    if full:
        lines.append(f"/16 fill ({pool.size:,} addresses) complete in {seconds:.2f} s = {pool.size / seconds:,.0f} "
                     f"allocations/s; first block of {BLOCK:,}: {first:,.0f}/s, last block: {last:,.0f}/s "
                     f"(cost x{growth:.1f} from empty to full)")
    else:
        # Cost per allocation grows linearly with the fill level (quadratic fill): the remaining blocks'
        # time extrapolated from the trend of the blocks done.
        done = pool.used
        per_alloc_slope = (blocks[-1] - blocks[0]) / BLOCK / max(done - BLOCK, 1)
        base = blocks[0] / BLOCK
        estimate = sum(base + per_alloc_slope * n for n in range(pool.size))
        lines.append(f"/16 fill ({pool.size:,} addresses) STOPPED by the {args.budget:.0f} s budget at {done:,} "
                     f"({done / pool.size:.0%}) after {seconds:.1f} s; first block of {BLOCK:,}: {first:,.0f}/s, "
                     f"last: {last:,.0f}/s (x{growth:.0f} slower): quadratic, a full fill extrapolates to "
                     f"~{estimate:.0f} s")
    per_op = churn(pool, args.churn if full else min(args.churn, 500))
    lines.append(f"release + reallocate on the {'full' if full else 'partly filled'} /16 "
                 f"({pool.used:,} used): {per_op * 1e6:,.1f} µs per pair ({1 / per_op:,.0f} pairs/s)")

    recorded, next_alloc = rebuild(args.owners)
    lines.append(f"rebuild: record {args.owners:,} owners scattered over a /16 in {recorded * 1e3:.1f} ms "
                 f"({args.owners / recorded:,.0f} records/s); the next allocation {next_alloc * 1e6:,.0f} µs")
    lines.append(f"first allocation after recording {args.owners:,} owners packed at the bottom of a /16: "
                 f"{dense_rebuild(args.owners) * 1e3:.2f} ms")
    lines.append(SHARED)
    record("IPAM throughput", lines, write=not args.no_write)


if __name__ == "__main__":
    main()
