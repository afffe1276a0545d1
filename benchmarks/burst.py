"""Burst: 100 VirtualMachines created at once, and 100 created 100 ms apart (KubeVirt's density test), on
simulated hosts; create→Running p50/p95/p99. Targets on a 2-core machine: p50 <= 1 s, p95 <= 3 s.

One ``cumulo-agent --simulate 10`` process, the production controller binary and the envtest control plane
(see benchmarks/simcloud.py for how latencies are taken: a watch's receive times, with the objects' own
whole-second timestamps as a cross-check). The hosts have room for both runs, so nothing is deleted between
them.

    .venv/bin/python benchmarks/burst.py [--guests 100] [--hosts 10] [--spacing 0.1] [--profile DIR] [--no-write]
        [--apiserver-profile DIR] [--identities tokens|certificates] [--no-audit]

``--apiserver-profile DIR`` takes kube-apiserver's own CPU profile (pprof) during each run and records, besides the
burst figures, a "kube-apiserver CPU per guest start" block: its CPU per start and per request, the shares of the
profile spent in each stage of a write (merge patch, managedFields, CEL, admission policy, audit, authentication,
watch decoding and serving, GC) and the top functions. Set GOGC in the environment to try the Go GC's knob (etcd
gets it too).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import record  # noqa: E402
from benchmarks.simcloud import ApiserverProfiler, Profiler, RunningWatch, SimCloud, create_guests  # noqa: E402
from benchmarks.simcloud import peak_rss_mib, request_counts, summary  # noqa: E402
from benchmarks.simcloud import timestamp_latencies  # noqa: E402


WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE", "APPLY", "DELETECOLLECTION")


def run(cloud: SimCloud, names: list[str], spacing: float, timeout: float) -> tuple[list[float], list[float], float]:
    requests = request_counts(cloud.apiserver_metrics())
    before = cloud.cpu()
    with RunningWatch(cloud) as watcher:
        started = time.monotonic()
        sent = create_guests(cloud, names, spacing=spacing)
        watcher.wait_all(names, timeout)
        took = time.monotonic() - started
    after = cloud.cpu()
    cloud.cpu_used = {name: after[name] - before[name] for name in after}
    # Two scrapes of /metrics are counted too (a GET each): negligible against hundreds of requests.
    cloud.requests_made = request_counts(cloud.apiserver_metrics()) - requests
    latencies = [watcher.running[name] - sent[name] for name in names]
    return latencies, timestamp_latencies(cloud, names), took


AUDIT_FLAGS = ("audit-policy-file", "audit-log-path", "audit-log-format", "audit-log-mode", "audit-log-maxsize",
               "audit-log-maxbackup")


def apiserver_args(args: argparse.Namespace) -> dict[str, str | None]:
    """kube-apiserver flags over envtest's (cumulo/envtest.py) for this run."""
    flags: dict[str, str | None] = {"profiling": "true"} if args.apiserver_profile else {}
    if args.no_audit:
        flags.update(dict.fromkeys(AUDIT_FLAGS))
    return flags


def configuration(args: argparse.Namespace) -> str:
    """How this run's apiserver was configured, for the record."""
    audit = "no audit log" if args.no_audit else "audit log on (Metadata level for every request, blocking mode)"
    identities = ("controller and agent with ServiceAccount tokens (agent: Pod-bound, simulator DaemonSet style)"
                  if args.identities == "tokens" else "controller and agent with client certificates")
    gogc = os.environ.get("GOGC")
    return (f"envtest flags (cumulo/envtest.py), {audit}, {identities}, profiling "
            f"{'on' if args.apiserver_profile else 'off'}, GOGC {gogc or 'default (100)'}, "
            f"GOMAXPROCS default ({os.cpu_count()} cores)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guests", type=int, default=100)
    parser.add_argument("--hosts", type=int, default=10)
    parser.add_argument("--spacing", type=float, default=0.1, help="seconds between creates in the second run")
    parser.add_argument("--only", choices=["burst", "spaced"], help="run one variant only")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--profile", type=Path, help="py-spy the controller and the agent during the runs into DIR")
    parser.add_argument("--apiserver-profile", type=Path,
                        help="kube-apiserver's pprof CPU profile of each run into DIR (starts it with --profiling)")
    parser.add_argument("--apiserver-profile-seconds", type=int, default=10)
    parser.add_argument("--identities", choices=["tokens", "certificates"], default="tokens",
                        help="how the controller and the agent authenticate (see benchmarks/simcloud.py)")
    parser.add_argument("--no-audit", action="store_true", help="run kube-apiserver without its audit log")
    parser.add_argument("--controller-arg", action="append", default=[], help="extra cumulo-controller flag")
    parser.add_argument("--agent-arg", action="append", default=[], help="extra cumulo-agent flag")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--no-write", action="store_true", help="print, do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)
    variants = [v for v in (("burst", 0.0), ("spaced", args.spacing)) if args.only in (None, v[0])]
    cpus = -(-args.guests * len(variants) // args.hosts) + 1
    lines: list[str] = []
    profile: list[str] = []
    with SimCloud(hosts=args.hosts, cpus_per_host=cpus, controller_args=args.controller_arg,
                  agent_args=args.agent_arg, keep=args.keep or bool(args.profile),
                  apiserver_args=apiserver_args(args), identities=args.identities) as cloud:
        for variant, spacing in variants:
            names = [f"{variant}-{i:04d}" for i in range(args.guests)]
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
                with Profiler(cloud.controller, args.profile / f"controller-{variant}.svg"), \
                        Profiler(cloud.controller, args.profile / f"controller-{variant}.txt"), \
                        Profiler(cloud.agent, args.profile / f"agent-{variant}.svg"):
                    latencies, stamped, took = run(cloud, names, spacing, args.timeout)
            elif args.apiserver_profile:
                args.apiserver_profile.mkdir(parents=True, exist_ok=True)
                profiler = ApiserverProfiler(cloud, args.apiserver_profile / f"kube-apiserver-{variant}.pprof",
                                             args.apiserver_profile_seconds)
                with profiler:
                    latencies, stamped, took = run(cloud, names, spacing, args.timeout)
            else:
                latencies, stamped, took = run(cloud, names, spacing, args.timeout)
            how = "at once (16 concurrent creates)" if spacing == 0 else f"{spacing * 1000:.0f} ms apart"
            lines.append(f"{args.guests} guests {how} on {args.hosts} simulated hosts: create→Running "
                         f"{summary(latencies)}; all Running {took:.1f} s after the first create "
                         f"(target p50 <= 1 s, p95 <= 3 s)")
            lines.append("  CPU seconds used meanwhile: " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in
                                                               cloud.cpu_used.items()) +
                         "; per guest start: " + ", ".join(f"{name} {seconds * 1000 / args.guests:.0f} ms"
                                                           for name, seconds in cloud.cpu_used.items()))
            made = cloud.requests_made
            writes = sum(made[verb] for verb in WRITE_VERBS)
            reads = made["GET"] + made["LIST"]
            lines.append(f"  kube-apiserver requests meanwhile: {writes:,} writes and {reads:,} reads (GET, LIST), "
                         f"{writes / args.guests:.1f} + {reads / args.guests:.1f} per guest start; its CPU per "
                         f"request {cloud.cpu_used['kube-apiserver'] * 1000 / max(1, writes + reads):.2f} ms")
            if stamped:
                lines.append(f"  same run from object timestamps (whole seconds): {summary(stamped)}")
            if args.apiserver_profile:
                cpu = cloud.cpu_used["kube-apiserver"]
                profile.append(f"{how}: kube-apiserver {cpu * 1000 / args.guests:.0f} ms of CPU per guest start "
                               f"({cpu:.1f} s for {args.guests}), {(writes + reads) / args.guests:.1f} requests per "
                               f"start, {cpu * 1000 / max(1, writes + reads):.2f} ms per request; where it goes "
                               f"(pprof over {args.apiserver_profile_seconds} s from the first create, share of "
                               "samples under each; shares overlap):")
                profile += [f"  {name.strip()}{' (of the CRD CEL rules above)' if name.startswith(' ') else ''}: "
                            f"{share}" for name, share in profiler.parts().items()]
                profile.append("  top functions by flat time (flat, flat%, sum%, cum, cum%): " + "; ".join(
                    f"`{' '.join(line.split())}`" for line in profiler.top(10)))
        if args.apiserver_profile:
            profile.append("open WATCH requests per resource at the end (apiserver_longrunning_requests: the "
                           "controller's, the agent's, this benchmark's on VirtualMachines and the apiserver's own "
                           "informers): " +
                           ", ".join(f"{resource} {count}" for resource, count in cloud.watchers().items()))
            profile.append(f"kube-apiserver: {configuration(args)}; profile files in {args.apiserver_profile}")
        lines.append(f"kube-apiserver: {configuration(args)}")
        lines.append(f"peak RSS: controller {peak_rss_mib(cloud.controller.pid):.0f} MiB, agent "
                     f"{peak_rss_mib(cloud.agent.pid):.0f} MiB; latencies from a watch's receive times (monotonic) "
                     "minus the create request's send time; machine shared with other engineers' test runs")
        if args.profile:
            lines.append(f"py-spy flame graphs in {args.profile}; logs in {cloud.workdir}")
    record("Burst: create→Running on simulated hosts", lines, write=not args.no_write)
    if profile:
        record("kube-apiserver CPU per guest start (burst)", profile, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
