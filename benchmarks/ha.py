"""HA: time from a host's heartbeat Lease expiring to its HA guests Running on other hosts (simulator). Target
<= 60 s.

Simulated hosts (benchmarks/simcloud.py) share a cluster-wide SharedMountPoint pool (for simulated hosts, an
in-memory pool shared by the agent process) and run guests of an ``offerHA`` ServiceOffering on it; the host with
the most of them dies: its Lease renewals and its storage heartbeat writes stop (the simulator's ``heartbeat`` and
``storage-heartbeat`` faults, set on the Host's annotation). Measured from the Lease's expiry (renewTime +
leaseDurationSeconds): the host going Disconnected (the host monitor), Down (neighbours read its storage heartbeat
stale for ``--down-after`` seconds; its agent fenced itself after ``--fence-after``), and each HA guest Running with
a placement on another host. ``--cut-off-only`` stops only the Lease (the storage heartbeat stays fresh): the host
must go Alert and no guest may move.

    .venv/bin/python benchmarks/ha.py [--hosts 4] [--guests 8] [--lease-duration 6] [--down-after 15]
                                      [--fence-after 10] [--wait 60] [--cut-off-only] [--no-write]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kubernetes import client  # noqa: E402

from benchmarks.common import record  # noqa: E402
from benchmarks.simcloud import GROUP, VERSION, RunningWatch, SimCloud, create_guests, parse_time, unique  # noqa: E402
from controllers.api.v1alpha1.common import SYSTEM_NAMESPACE  # noqa: E402
from controllers.api.v1alpha1.host import SIMULATOR_FAULTS_ANNOTATION, heartbeat_lease_name  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--guests", type=int, default=8)
    parser.add_argument("--lease-duration", type=int, default=6, help="the agent's heartbeat Lease, seconds "
                        "(renewed, and the storage heartbeat written, every third of it)")
    parser.add_argument("--alert-after", type=float, default=10.0,
                        help="the controller's --host-alert-after: Disconnected this long → Alert")
    parser.add_argument("--down-after", type=float, default=15.0,
                        help="the controller's --host-down-after: both heartbeats silent this long → Down")
    parser.add_argument("--fence-after", type=float, default=10.0, help="the agent's --fence-after")
    parser.add_argument("--wait", type=float, default=60.0,
                        help="seconds after the expiry to wait for the HA guests (the target)")
    parser.add_argument("--cut-off-only", action="store_true",
                        help="stop only the Lease: the host must be Alert and nothing may move")
    parser.add_argument("--no-write", action="store_true", help="print, do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)
    interval = args.lease_duration / 3
    with SimCloud(hosts=args.hosts, cpus_per_host=args.guests, controller_args=[
            "--host-alert-after", str(args.alert_after), "--host-down-after", str(args.down_after)], agent_args=[
            "--heartbeat-interval", str(interval), "--lease-duration", str(args.lease_duration),
            "--storage-heartbeat-interval", str(interval), "--fence-after", str(args.fence_after)]) as cloud:
        shared = unique("nfs")
        cloud.create_cluster_object("storagepools", "StoragePool", shared, {
            "zone": cloud.zone, "scope": "Cluster", "cluster": cloud.cluster, "type": "SharedMountPoint",
            "path": f"/sim/{shared}"})
        offering = unique("ha")
        cloud.create_cluster_object("serviceofferings", "ServiceOffering", offering, {
            "cpuNumber": 1, "memoryMiB": 256, "storageType": "shared", "offerHA": True})
        cloud.vm_spec = lambda: {"serviceOffering": offering, "template": {"name": "img"}, "zone": cloud.zone}
        cloud.wait(lambda: all(shared in ((h.get("status") or {}).get("node") or {}).get("storagePools", {}) for h in
                               cloud.custom.list_cluster_custom_object(GROUP, VERSION, "hosts")["items"]),
                   timeout=60, what="every host reporting the shared pool")
        names = [f"ha-{i:03d}" for i in range(args.guests)]
        with RunningWatch(cloud) as watcher:
            create_guests(cloud, names)
            watcher.wait_all(names, 120)

        def guests() -> dict[str, dict]:
            items = cloud.custom.list_namespaced_custom_object(GROUP, VERSION, cloud.namespace,
                                                               "virtualmachines")["items"]
            return {item["metadata"]["name"]: item.get("status") or {} for item in items}

        placed = collections.Counter((status.get("placement") or {}).get("host") for status in guests().values())
        victim, count = placed.most_common(1)[0]
        on_victim = [name for name, status in guests().items()
                     if (status.get("placement") or {}).get("host") == victim]
        faults = {"heartbeat": {"fail": True, "message": "host down"}}
        if not args.cut_off_only:
            faults["storage-heartbeat"] = {"fail": True, "message": "host down"}
        cloud.custom.patch_cluster_custom_object(GROUP, VERSION, "hosts", victim, {"metadata": {"annotations": {
            SIMULATOR_FAULTS_ANNOTATION: json.dumps(faults)}}})
        # The last renewal may land just after the fault was set; the expiry follows the last one.
        time.sleep(interval + 0.5)
        lease = client.CoordinationV1Api(cloud.api).read_namespaced_lease(heartbeat_lease_name(victim),
                                                                          SYSTEM_NAMESPACE)
        expiry = lease.spec.renew_time.timestamp() + lease.spec.lease_duration_seconds
        states: dict[str, float] = {}
        moved: dict[str, float] = {}
        hosts_seen: dict[str, set[str]] = collections.defaultdict(set)
        deadline = expiry + args.wait
        done = "Alert" if args.cut_off_only else "Down"
        while time.time() < deadline and not (len(moved) == len(on_victim) and done in states):
            state = (cloud.custom.get_cluster_custom_object(GROUP, VERSION, "hosts", victim).get("status") or {}).get(
                "state")
            states.setdefault(state, time.time())
            for name, status in guests().items():
                host = (status.get("placement") or {}).get("host")
                if name in on_victim and host:
                    hosts_seen[name].add(host)
                if name in on_victim and status.get("phase") == "Running" and host and host != victim:
                    moved.setdefault(name, time.time())
            time.sleep(0.2)
        victim_status = cloud.custom.get_cluster_custom_object(GROUP, VERSION, "hosts", victim).get("status") or {}
        heartbeat = next((c for c in victim_status.get("conditions", []) if c["type"] == "Heartbeat"), {})

    def since(stamp: float | None) -> str:
        return f"{stamp - expiry:.1f} s" if stamp is not None else "never"

    what = "stops renewing its Lease only (storage heartbeat fresh)" if args.cut_off_only else \
        "dies (Lease and storage heartbeat stop)"
    lines = [f"host {victim} ({count} of {args.guests} HA guests on a shared pool) {what}; Lease of "
             f"{args.lease_duration} s, heartbeats every {interval:g} s, agent --fence-after {args.fence_after:g}, "
             f"controller --host-down-after {args.down_after:g} --host-alert-after {args.alert_after:g}; from the "
             f"Lease's expiry: Disconnected after {since(states.get('Disconnected'))}, Alert after "
             f"{since(states.get('Alert'))}, Down after {since(states.get('Down'))} (polled every 0.2 s); the host's "
             f"Heartbeat condition: {heartbeat.get('reason')}"]
    if args.cut_off_only:
        lines.append(f"HA guests moved: {len(moved)} of {len(on_victim)} within {args.wait:g} s of the expiry "
                     "(expected 0: the host is alive)")
    elif moved:
        latencies = sorted(moved[name] - expiry for name in moved)
        twice = sum(1 for name in on_victim if len(hosts_seen[name] - {victim}) > 1)
        lines.append(f"HA guests Running elsewhere: {len(moved)} of {len(on_victim)}, the first "
                     f"{latencies[0]:.1f} s and the last {latencies[-1]:.1f} s after the expiry (target <= 60 s); "
                     f"guests placed on more than one other host: {twice}")
    else:
        lines.append(f"no HA guest of {victim} runs elsewhere {args.wait:g} s after the expiry")
    record("HA: lease expiry → host Down → HA guests Running elsewhere" if not args.cut_off_only else
           "HA: lease expiry with a fresh storage heartbeat → host Alert, nothing moves", lines,
           write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
