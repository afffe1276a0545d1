"""API load: writes to the apiserver per VM start, from kube-apiserver's own ``/metrics``
(``apiserver_request_total`` by verb, resource and subresource, before and after), with the writers named
from the audit log. Target: <= 4 writes per VM start across all kinds (the user's create not counted).
Reference: KubeVirt, about 5.9 VMI UPDATEs + 1 PATCH + 1 pod create per VMI.

The guests are created at once on simulated hosts (benchmarks/simcloud.py); the count runs from just
before the first create until every guest is Running and the writes have settled (no write about a
VirtualMachine, Volume or UsageRecord for ``--settle`` seconds). The background (heartbeat Leases, host
reports), measured over an idle window of the same length before, is subtracted.

    .venv/bin/python benchmarks/api_writes.py [--guests 100] [--hosts 10] [--no-write]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import sys
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import record  # noqa: E402
from benchmarks.simcloud import AGENT_USERS, CONTROLLER_USERS, RunningWatch, SimCloud, create_guests  # noqa: E402

WRITE_VERBS = {"POST", "PUT", "PATCH", "DELETE", "APPLY", "DELETECOLLECTION"}
AUDIT_WRITES = {"create", "update", "patch", "delete", "deletecollection"}
GUEST_KINDS = {"virtualmachines", "volumes", "usagerecords", "events"}


def write_counts(metrics_text: str) -> collections.Counter[tuple[str, str]]:
    """apiserver_request_total of write verbs by (verb, resource[/subresource])."""
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "apiserver_request":
            continue
        for sample in family.samples:
            labels = sample.labels
            if not sample.name.endswith("_total") or labels.get("verb") not in WRITE_VERBS:
                continue
            resource = labels.get("resource", "") + (f"/{labels['subresource']}" if labels.get("subresource") else "")
            counts[labels["verb"], resource] += int(sample.value)
    return counts


def audit_writes(path: Path, since: float, until: float) -> collections.Counter[tuple[str, str, str]]:
    """Writes in the audit log between two wall-clock times, by (writer, verb, resource[/subresource])."""
    counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
    with path.open() as log:
        for line in log:
            entry = json.loads(line)
            if entry.get("verb") not in AUDIT_WRITES:
                continue
            stamp = datetime.datetime.fromisoformat(entry["requestReceivedTimestamp"].replace("Z", "+00:00"))
            if not since <= stamp.timestamp() < until:
                continue
            ref = entry.get("objectRef") or {}
            resource = ref.get("resource", "?") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
            user = entry.get("user", {}).get("username", "?")
            writer = "controller" if user in CONTROLLER_USERS else "benchmark" if user == "cumulo-admin" else (
                "agent" if user.startswith(AGENT_USERS) else user)
            counts[writer, entry["verb"], resource] += 1
    return counts


def last_guest_write(path: Path) -> float:
    last = 0.0
    with path.open() as log:
        for line in log:
            entry = json.loads(line)
            if entry.get("verb") in AUDIT_WRITES and (entry.get("objectRef") or {}).get("resource") in GUEST_KINDS:
                stamp = entry["requestReceivedTimestamp"].replace("Z", "+00:00")
                last = max(last, datetime.datetime.fromisoformat(stamp).timestamp())
    return last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guests", type=int, default=100)
    parser.add_argument("--hosts", type=int, default=10)
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of the idle window (background writes)")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--controller-arg", action="append", default=[])
    parser.add_argument("--agent-arg", action="append", default=[])
    parser.add_argument("--no-write", action="store_true", help="print, do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)
    names = [f"vm-{i:04d}" for i in range(args.guests)]
    with SimCloud(hosts=args.hosts, cpus_per_host=-(-args.guests // args.hosts) + 1,
                  controller_args=args.controller_arg, agent_args=args.agent_arg) as cloud:
        audit = cloud.plane.audit_log
        time.sleep(args.settle)  # the start-up writes (host registration, first reports) settle
        with RunningWatch(cloud) as watcher:
            idle_start = time.time()
            time.sleep(args.idle)
            idle_end = time.time()
            before = write_counts(cloud.apiserver_metrics())
            started = time.time()
            create_guests(cloud, names)
            watcher.wait_all(names, args.timeout)
            running = time.time()
            while time.time() - max(last_guest_write(audit), running) < args.settle:
                time.sleep(0.5)
            after = write_counts(cloud.apiserver_metrics())
            ended = time.time()
        window = ended - started
        background = audit_writes(audit, idle_start, idle_end)
        during = audit_writes(audit, started, ended)
    scale = window / (idle_end - idle_start)
    metric_delta = after - before
    total = sum(metric_delta.values())
    creates = metric_delta.get(("POST", "virtualmachines"), 0)
    background_total = sum(background.values()) * scale
    per_vm = (total - args.guests - background_total) / args.guests
    lines = [f"{args.guests} guests started at once on {args.hosts} simulated hosts: {per_vm:.1f} writes per VM start "
             f"(target <= 4; reference KubeVirt ~7.9) — apiserver_request_total write verbs rose by {total:,} over "
             f"{window:.1f} s, minus the {creates} creates of the guests themselves and ~{background_total:.0f} "
             f"background writes (heartbeats, host reports: {sum(background.values())} in an idle {args.idle:g} s, "
             "scaled)"]
    by_resource = collections.Counter()
    for (verb, resource), count in metric_delta.items():
        by_resource[f"{verb} {resource}"] += count
    lines.append("by verb and resource (apiserver metrics, per VM start): " + ", ".join(
        f"{key} {count / args.guests:.2f}" for key, count in by_resource.most_common() if count))
    net = collections.Counter({key: count - background.get(key, 0) * scale for key, count in during.items()})
    lines.append("who writes what (audit log, per VM start, background subtracted): " + ", ".join(
        f"{writer} {verb} {resource} {count / args.guests:.2f}" for (writer, verb, resource), count
        in net.most_common() if count / args.guests >= 0.05))
    record("API writes per VM start", lines, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
