"""Scale: N simulated hosts and M VirtualMachines (the issue's size: 1,000 hosts, 10,000 guests): time until all
are Running (target <= 10 min), controller and agent peak RSS (target controller <= 400 MB), and how long
``kubectl get vm -A`` takes with every guest listed.

The hosts run in ``cumulo-agent --simulate`` processes of ``--hosts-per-agent`` hosts each, against the envtest
control plane and the production controller binary (benchmarks/simcloud.py). The guests are created from 16
client threads as fast as the apiserver takes them. Peak RSS is the kernel's high-water mark (VmHWM).

    .venv/bin/python benchmarks/scale.py [--hosts 1000] [--vms 10000] [--hosts-per-agent 100] [--no-write]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.api_writes import write_counts  # noqa: E402
from benchmarks.common import record  # noqa: E402
from benchmarks.simcloud import RunningWatch, SimCloud, create_guests, peak_rss_mib, percentile  # noqa: E402
from cumulo import toolchain  # noqa: E402


def kubectl_get_all(cloud: SimCloud, repeat: int) -> list[float]:
    """Seconds of ``kubectl get vm -A`` (table output, as a user would run it)."""
    times = []
    for _ in range(repeat):
        started = time.monotonic()
        result = subprocess.run([str(toolchain.binary("kubectl")), "--kubeconfig", str(cloud.plane.admin_kubeconfig),
                                 "--cache-dir", str(cloud.workdir / "kubectl-cache"), "get", "vm", "-A"],
                                capture_output=True, text=True, timeout=600)
        times.append(time.monotonic() - started)
        if result.returncode != 0:
            raise RuntimeError(f"kubectl get vm -A failed: {result.stderr}")
    return times


def background(cloud: SimCloud, seconds: float) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
    """What the idle hosts cost before any guest exists: cores per process (agents summed) and writes per second
    by (verb, resource), over ``seconds``."""
    cpu, writes = cloud.cpu(), write_counts(cloud.apiserver_metrics())
    time.sleep(seconds)
    cpu_after, writes_after = cloud.cpu(), write_counts(cloud.apiserver_metrics())
    cores: dict[str, float] = {}
    for name, value in cpu_after.items():
        group = "agents" if name.startswith("agent") else name
        cores[group] = cores.get(group, 0.0) + (value - cpu[name]) / seconds
    return cores, {key: (writes_after[key] - writes[key]) / seconds for key in writes_after
                   if writes_after[key] > writes[key]}


def wait_reporting(watcher: RunningWatch, names: list[str], first: float, timeout: float) -> tuple[int, float | None]:
    """Wait until every guest is Running or ``timeout``; print progress each minute. Returns how many were Running
    600 s after ``first`` (the target) and the seconds until all were (None after a timeout)."""
    at_target: int | None = None
    next_report = first + 60
    while True:
        try:
            watcher.wait_all(names, min(5.0, max(0.0, first + timeout - time.monotonic())))
            elapsed = time.monotonic() - first
            return (len(names) if at_target is None else at_target), elapsed
        except TimeoutError:
            pass
        now = time.monotonic()
        if at_target is None and now - first >= 600:
            at_target = len(watcher.running)
        if now >= next_report:
            print(f"{now - first:.0f} s: {len(watcher.running):,} of {len(names):,} Running", flush=True)
            next_report += 60
        if now - first >= timeout:
            return (len(watcher.running) if at_target is None else at_target), None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--vms", type=int, default=10000)
    parser.add_argument("--hosts-per-agent", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--idle", type=float, default=30, help="seconds of the idle hosts' background measured first")
    parser.add_argument("--controller-arg", action="append", default=[])
    parser.add_argument("--agent-arg", action="append", default=[])
    parser.add_argument("--no-write", action="store_true", help="print, do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)
    names = [f"vm-{i:05d}" for i in range(args.vms)]
    started = time.monotonic()
    with SimCloud(hosts=args.hosts, cpus_per_host=-(-args.vms // args.hosts) + 1, hosts_per_agent=args.hosts_per_agent,
                  controller_args=args.controller_arg, agent_args=args.agent_arg) as cloud:
        ready = time.monotonic() - started
        idle_cores, idle_writes = background(cloud, args.idle)
        before = cloud.cpu()
        with RunningWatch(cloud) as watcher:
            first = time.monotonic()
            sent = create_guests(cloud, names)
            created = time.monotonic() - first
            at_target, all_running = wait_reporting(watcher, names, first, args.timeout)
        after = cloud.cpu()
        latencies = [watcher.running[name] - sent[name] for name in names if name in watcher.running]
        listing = kubectl_get_all(cloud, 3)
        controller_rss = peak_rss_mib(cloud.controller.pid)
        agent_rss = [peak_rss_mib(agent.pid) for agent in cloud.agents]
    cpu = {name: after[name] - before[name] for name in after}
    agent_cpu = sum(seconds for name, seconds in cpu.items() if name.startswith("agent"))
    outcome = (f"all Running {all_running:.0f} s after the first create" if all_running is not None else
               f"NOT all Running: {len(latencies):,} of {args.vms:,} after the --timeout of {args.timeout:.0f} s")
    lines = [
        f"{args.vms:,} guests on {args.hosts:,} simulated hosts ({len(agent_rss)} agent processes of "
        f"{args.hosts_per_agent} hosts): {outcome} (target <= 600 s at 1,000 hosts / 10,000 guests; Running "
        f"600 s after the first create: {at_target:,}); creating them took {created:.0f} s "
        f"({args.vms / created:.0f}/s); create→Running of those Running p50 {percentile(latencies, 50):.1f} s, "
        f"p95 {percentile(latencies, 95):.1f} s",
        f"peak RSS: controller {controller_rss:.0f} MiB (target <= 400 MB), agents max {max(agent_rss):.0f} MiB "
        f"(total {sum(agent_rss):.0f} MiB)",
        f"`kubectl get vm -A` with {args.vms:,} guests: median {statistics.median(listing):.2f} s "
        f"(runs: {', '.join(f'{t:.2f}' for t in listing)})",
        f"background of the idle hosts before any guest ({args.idle:.0f} s): cores "
        + ", ".join(f"{name} {value:.2f}" for name, value in idle_cores.items())
        + "; writes/s " + ", ".join(f"{verb} {resource} {rate:.1f}" for (verb, resource), rate in
                                    sorted(idle_writes.items(), key=lambda item: -item[1])[:3]),
        f"CPU seconds while starting them: controller {cpu['controller']:.0f}, agents {agent_cpu:.0f}, "
        f"kube-apiserver {cpu['kube-apiserver']:.0f}, etcd {cpu['etcd']:.0f}; set-up (control plane, hosts Up) "
        f"{ready:.0f} s; machine shared with other engineers' test runs",
    ]
    record(f"Scale: {args.hosts:,} hosts, {args.vms:,} guests", lines, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
