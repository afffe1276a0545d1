"""Burst: 100 VirtualMachines created at once, and 100 created 100 ms apart (KubeVirt's density test), on
simulated hosts; create→Running p50/p95/p99. Targets on a 2-core machine: p50 <= 1 s, p95 <= 3 s.

One ``cumulo-agent --simulate 10`` process, the production controller binary and the envtest control plane
(see benchmarks/simcloud.py for how latencies are taken: a watch's receive times, with the objects' own
whole-second timestamps as a cross-check). The hosts have room for both runs, so nothing is deleted between
them.

    .venv/bin/python benchmarks/burst.py [--guests 100] [--hosts 10] [--spacing 0.1] [--profile DIR] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import record  # noqa: E402
from benchmarks.simcloud import Profiler, RunningWatch, SimCloud, create_guests, peak_rss_mib, summary  # noqa: E402
from benchmarks.simcloud import timestamp_latencies  # noqa: E402


def run(cloud: SimCloud, names: list[str], spacing: float, timeout: float) -> tuple[list[float], list[float], float]:
    before = cloud.cpu()
    with RunningWatch(cloud) as watcher:
        started = time.monotonic()
        sent = create_guests(cloud, names, spacing=spacing)
        watcher.wait_all(names, timeout)
        took = time.monotonic() - started
    after = cloud.cpu()
    cloud.cpu_used = {name: after[name] - before[name] for name in after}
    latencies = [watcher.running[name] - sent[name] for name in names]
    return latencies, timestamp_latencies(cloud, names), took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guests", type=int, default=100)
    parser.add_argument("--hosts", type=int, default=10)
    parser.add_argument("--spacing", type=float, default=0.1, help="seconds between creates in the second run")
    parser.add_argument("--only", choices=["burst", "spaced"], help="run one variant only")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--profile", type=Path, help="py-spy the controller and the agent during the runs into DIR")
    parser.add_argument("--controller-arg", action="append", default=[], help="extra cumulo-controller flag")
    parser.add_argument("--agent-arg", action="append", default=[], help="extra cumulo-agent flag")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--no-write", action="store_true", help="print, do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)
    variants = [v for v in (("burst", 0.0), ("spaced", args.spacing)) if args.only in (None, v[0])]
    cpus = -(-args.guests * len(variants) // args.hosts) + 1
    lines = []
    with SimCloud(hosts=args.hosts, cpus_per_host=cpus, controller_args=args.controller_arg,
                  agent_args=args.agent_arg, keep=args.keep or bool(args.profile)) as cloud:
        for variant, spacing in variants:
            names = [f"{variant}-{i:04d}" for i in range(args.guests)]
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
                with Profiler(cloud.controller, args.profile / f"controller-{variant}.svg"), \
                        Profiler(cloud.controller, args.profile / f"controller-{variant}.txt"), \
                        Profiler(cloud.agent, args.profile / f"agent-{variant}.svg"):
                    latencies, stamped, took = run(cloud, names, spacing, args.timeout)
            else:
                latencies, stamped, took = run(cloud, names, spacing, args.timeout)
            how = "at once (16 concurrent creates)" if spacing == 0 else f"{spacing * 1000:.0f} ms apart"
            lines.append(f"{args.guests} guests {how} on {args.hosts} simulated hosts: create→Running "
                         f"{summary(latencies)}; all Running {took:.1f} s after the first create "
                         f"(target p50 <= 1 s, p95 <= 3 s)")
            lines.append("  CPU seconds used meanwhile: " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in
                                                               cloud.cpu_used.items()))
            if stamped:
                lines.append(f"  same run from object timestamps (whole seconds): {summary(stamped)}")
        lines.append(f"peak RSS: controller {peak_rss_mib(cloud.controller.pid):.0f} MiB, agent "
                     f"{peak_rss_mib(cloud.agent.pid):.0f} MiB; latencies from a watch's receive times (monotonic) "
                     "minus the create request's send time; machine shared with other engineers' test runs")
        if args.profile:
            lines.append(f"py-spy flame graphs in {args.profile}; logs in {cloud.workdir}")
    record("Burst: create→Running on simulated hosts", lines, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
