"""HA: time from a host's heartbeat Lease expiring to its HA guests Running on other hosts (simulator). Target
<= 60 s.

Simulated hosts (benchmarks/simcloud.py) run guests of an ``offerHA`` ServiceOffering; the host with the most of
them loses its heartbeat (the simulator's ``heartbeat`` fault, set on the Host's annotation, as a dead agent
would: the Lease is simply not renewed any more). Measured from the Lease's expiry (renewTime +
leaseDurationSeconds): the host going Disconnected and Alert (the host monitor), and each HA guest Running with
a placement on another host. HA restart belongs to issue 7; while it is missing the script says so and reports
what exists (expiry → Disconnected → Alert) rather than a figure it did not measure.

    .venv/bin/python benchmarks/ha.py [--hosts 4] [--guests 8] [--alert-after 10] [--wait 60] [--no-write]
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
    parser.add_argument("--lease-duration", type=int, default=6, help="the agent's heartbeat Lease, seconds")
    parser.add_argument("--alert-after", type=float, default=10.0,
                        help="the controller's --host-alert-after: Disconnected this long → Alert")
    parser.add_argument("--wait", type=float, default=60.0,
                        help="seconds after the expiry to wait for the HA guests (the target)")
    parser.add_argument("--no-write", action="store_true", help="print, do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)
    with SimCloud(hosts=args.hosts, cpus_per_host=args.guests, controller_args=[
            "--host-alert-after", str(args.alert_after)], agent_args=[
            "--heartbeat-interval", str(args.lease_duration / 3), "--lease-duration", str(args.lease_duration)]) \
            as cloud:
        offering = unique("ha")
        cloud.create_cluster_object("serviceofferings", "ServiceOffering", offering, {
            "cpuNumber": 1, "memoryMiB": 256, "storageType": "local", "offerHA": True})
        cloud.vm_spec = lambda: {"serviceOffering": offering, "template": {"name": "img"}, "zone": cloud.zone}
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
        cloud.custom.patch_cluster_custom_object(GROUP, VERSION, "hosts", victim, {"metadata": {"annotations": {
            SIMULATOR_FAULTS_ANNOTATION: json.dumps({"heartbeat": {"fail": True, "message": "host down"}})}}})
        lease = client.CoordinationV1Api(cloud.api).read_namespaced_lease(heartbeat_lease_name(victim),
                                                                          SYSTEM_NAMESPACE)
        # The last renewal may land just after the fault was set; the expiry follows the last one.
        time.sleep(args.lease_duration / 3 + 0.5)
        lease = client.CoordinationV1Api(cloud.api).read_namespaced_lease(heartbeat_lease_name(victim),
                                                                          SYSTEM_NAMESPACE)
        expiry = lease.spec.renew_time.timestamp() + lease.spec.lease_duration_seconds
        states: dict[str, float] = {}
        moved: dict[str, float] = {}
        deadline = expiry + args.alert_after + args.wait
        while time.time() < deadline and not (len(moved) == len(on_victim) and "Alert" in states):
            state = (cloud.custom.get_cluster_custom_object(GROUP, VERSION, "hosts", victim).get("status") or {}).get(
                "state")
            states.setdefault(state, time.time())
            for name, status in guests().items():
                host = (status.get("placement") or {}).get("host")
                if name in on_victim and status.get("phase") == "Running" and host and host != victim:
                    moved.setdefault(name, time.time())
            time.sleep(0.2)
        alert_reason = next((c.get("message") for c in (cloud.custom.get_cluster_custom_object(
            GROUP, VERSION, "hosts", victim).get("status") or {}).get("conditions", []) if c["type"] == "Ready"), "")

    def since(stamp: float | None) -> str:
        return f"{stamp - expiry:.1f} s" if stamp is not None else "never"

    lines = [f"host {victim} ({count} of {args.guests} HA guests) stops heartbeating (Lease of {args.lease_duration} "
             f"s, controller --host-alert-after {args.alert_after:g}); from the Lease's expiry: Disconnected after "
             f"{since(states.get('Disconnected'))}, Alert after {since(states.get('Alert'))} "
             f"(expected {args.alert_after:g} s; polled every 0.2 s)"]
    if moved:
        latencies = sorted(moved[name] - expiry for name in moved)
        lines.append(f"HA guests Running elsewhere: {len(moved)} of {len(on_victim)}, the last "
                     f"{latencies[-1]:.1f} s after the expiry (target <= 60 s)")
    else:
        lines.append(f"HA restart is not implemented yet (issue 7): {args.alert_after + args.wait:.0f} s after the "
                     f"expiry none of the {len(on_victim)} HA guests of {victim} runs elsewhere, so expiry → HA "
                     "guests Running elsewhere has no figure; the host's Ready message: " + repr(alert_reason))
    record("HA: lease expiry → host Alert → HA guests elsewhere", lines, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
