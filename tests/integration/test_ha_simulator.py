"""VM high availability without split brain, on simulated hosts (one agent process, three hosts sharing an
in-memory storage heartbeat "pool"; a controller of the module's own with short HA timings).

1. host-0 stops renewing its Lease but keeps writing its storage heartbeat: neighbours read it fresh, the host is
   Alert and nothing moves, well past the Down threshold.
2. It stops writing its storage heartbeat too: its agent fences itself (destroys the HA guest's domain), the
   neighbours read the heartbeat stale, the host is Down; the HA guest on shared storage is placed on another host
   exactly once and runs there; the non-HA guest and the HA guest on local storage stay, stopped, with reasons.
   A controller crash then changes nothing (the host stays Down, no guest is placed again).
3. host-0 comes back: Up again, and its agent does not start the moved guest (a direct GET first).
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

pytest.register_assert_rewrite("conftest_libvirt")
from conftest_libvirt import Cloud, unique, wait_for  # noqa: E402

from controllers.api.v1alpha1.host import SIMULATOR_FAULTS_ANNOTATION, investigate_annotation  # noqa: E402

from cumuloprocess import CumuloProcess, console_script  # noqa: E402
from privateplane import private_plane_fixtures  # noqa: E402

pytest_plugins = ["conftest_libvirt"]
control_plane, kube, system_namespace = private_plane_fixtures()
pytestmark = pytest.mark.timeout(300)

GROUP, VERSION = "cumulo.io", "v1alpha1"
DOWN_AFTER = 12.0
FENCE_AFTER = 7.0


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == kind), {})


def test_ha_restart_only_when_both_heartbeats_are_stale(control_plane, system_namespace, cloud: Cloud, agents,
                                                         tmp_path) -> None:
    controller = CumuloProcess("controller", [
        console_script("cumulo-controller"), "--kubeconfig", str(control_plane.admin_kubeconfig),
        "--metrics-port", "0", "--host-alert-after", "300", "--host-down-after", str(DOWN_AFTER)],
        tmp_path / "controller.log")
    try:
        controller.wait_for_log("reconciling with", timeout=60)
        run_scenario(control_plane, cloud, agents, controller)
    finally:
        controller.stop()


def run_scenario(control_plane, cloud: Cloud, agents, controller: CumuloProcess) -> None:
    custom = cloud.custom
    zone, pod, cluster, base = unique("zone"), unique("pod"), unique("ha"), unique("hahost")
    hosts = [f"{base}-{index}" for index in range(3)]
    cloud.create("zones", zone, {"networkType": "Advanced", "dns1": "192.0.2.53", "localStorageEnabled": True})
    cloud.create("hostpods", pod, {"zone": zone, "cidr": "10.252.0.0/24", "gateway": "10.252.0.1",
                                   "startIp": "10.252.0.10", "endIp": "10.252.0.20"})
    cloud.create("clusters", cluster, {"pod": pod, "hypervisorType": "Simulator"})
    shared = unique("nfs")
    cloud.create("storagepools", shared, {"zone": zone, "scope": "Cluster", "cluster": cluster,
                                          "type": "SharedMountPoint", "path": f"/sim/{shared}"})
    for host in hosts:
        cloud.create("storagepools", f"{host}-local", {"zone": zone, "scope": "Host", "type": "Filesystem",
                                                       "host": host, "path": f"/sim/{host}"})
        # Only host-0 takes the guests at first.
        cloud.create("hosts", host, {"cluster": cluster, "allocationState": "Enabled" if host == hosts[0]
                                     else "Disabled"})
    cloud.create("imagestores", unique("store"), {"zone": zone, "type": "Filesystem", "path": "/sim/images"})
    offerings = {"ha": unique("ha"), "plain": unique("plain"), "halocal": unique("halocal")}
    for key, name in offerings.items():
        cloud.create("serviceofferings", name, {"cpuNumber": 1, "cpuSpeedMHz": 1000, "memoryMiB": 256,
                                                "storageType": "local" if key == "halocal" else "shared",
                                                "offerHA": key != "plain"})
    namespace = unique("tenant")
    control_plane.kubectl("create", "namespace", namespace)
    agent = agents.start(base, "--host", base, "--hypervisor", "simulator", "--simulate", "3",
                         "--sim-cpus", "8", "--sim-memory-mib", "8192", "--heartbeat-interval", "1",
                         "--lease-duration", "4", "--storage-heartbeat-interval", "1",
                         "--fence-after", str(FENCE_AFTER), "--vm-resync", "2", "--orphan-sweep", "3")
    for host in hosts:
        wait_for(lambda h=host: (cloud.get("hosts", h).get("status") or {}).get("state") == "Up", timeout=60,
                 what=f"{host} Up")

    def create(plural: str, kind: str, name: str, spec: dict[str, Any]) -> None:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name, "namespace": namespace},
            "spec": spec})

    def vm(name: str) -> dict[str, Any]:
        try:
            return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "virtualmachines", name)
        except ApiException as error:
            if error.status == 404:
                return {}
            raise

    def placed(name: str) -> str | None:
        return ((vm(name).get("status") or {}).get("placement") or {}).get("host")

    def phase(name: str) -> str | None:
        return (vm(name).get("status") or {}).get("phase")

    create("templates", "Template", "img", {"url": "file:///sim/images/img.qcow2", "format": "QCOW2", "zone": zone,
                                            "hypervisor": "Simulator"})
    wait_for(lambda: (custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "templates", "img").get("status")
                      or {}).get("state") == "Ready", timeout=60, what="template Ready")
    guests = {"ha": "guest-ha", "plain": "guest-plain", "halocal": "guest-halocal"}
    for key, name in guests.items():
        create("virtualmachines", "VirtualMachine", name, {"serviceOffering": offerings[key],
                                                          "template": {"name": "img"}, "zone": zone})
    wait_for(lambda: all(phase(name) == "Running" for name in guests.values()), timeout=90,
             what="the guests Running")
    assert {placed(name) for name in guests.values()} == {hosts[0]}
    for host in hosts[1:]:
        cloud.patch("hosts", host, {"spec": {"allocationState": "Enabled"}})

    # Placements, as often as we can look: one change per guest at most.
    history: dict[str, list[str | None]] = {name: [hosts[0]] for name in guests.values()}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for name in guests.values():
                try:
                    host = placed(name)
                except Exception:  # noqa: BLE001 - a transient API error; look again
                    continue
                if host != history[name][-1]:
                    history[name].append(host)
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        # 1. Lease lost, storage heartbeat fresh: Alert, nothing moves.
        set_faults(cloud, hosts[0], {"heartbeat": {"fail": True, "message": "cut off from the API"}})
        host = wait_for(lambda: (h := cloud.get("hosts", hosts[0])).get("status", {}).get("state") == "Alert" and h,
                        timeout=60, what=f"{hosts[0]} Alert")
        assert condition(host, "Heartbeat")["reason"] == "StorageHeartbeatFresh", condition(host, "Heartbeat")
        neighbours = [h for h in hosts[1:] if investigate_annotation(hosts[0]) in
                      (cloud.get("hosts", h)["metadata"].get("annotations") or {})]
        assert neighbours, "no neighbour was asked to investigate"
        answer = cloud.node(neighbours[0])["investigations"][hosts[0]][shared]
        assert answer["readable"] and answer["fresh"]
        time.sleep(DOWN_AFTER + 8)  # well past the Down threshold
        host = cloud.get("hosts", hosts[0])
        assert host["status"]["state"] == "Alert", condition(host, "Heartbeat")
        assert all(history[name] == [hosts[0]] for name in guests.values()), history
        assert all(phase(name) == "Running" for name in guests.values())

        # 2. The storage heartbeat stops too: the agent fences, the host is Down, the HA guest moves once.
        stopped = time.monotonic()
        set_faults(cloud, hosts[0], {"heartbeat": {"fail": True, "message": "cut off from the API"},
                                     "storage-heartbeat": {"fail": True, "message": "cut off from storage"}})
        host = wait_for(lambda: (h := cloud.get("hosts", hosts[0])).get("status", {}).get("state") == "Down" and h,
                        timeout=90, what=f"{hosts[0]} Down")
        down_at = time.monotonic() - stopped
        assert condition(host, "Heartbeat")["reason"] == "Fenced"
        assert down_at > DOWN_AFTER - 1, f"Down after {down_at:.1f}s, before the storage heartbeat could be stale"
        wait_for(lambda: phase(guests["ha"]) == "Running" and placed(guests["ha"]) not in (None, hosts[0]),
                 timeout=60, what="the HA guest Running on another host")
        print(f"HA guest Running elsewhere {time.monotonic() - stopped:.1f}s after the storage heartbeat stopped "
              f"(Down after {down_at:.1f}s)")
        moved = vm(guests["ha"])
        assert moved["status"]["node"]["host"] == placed(guests["ha"])
        assert "HA restart" in condition(moved, "Scheduled")["message"]
        for key, reason in (("plain", "HostDown"), ("halocal", "LocalStorage")):
            obj = wait_for(lambda n=guests[key]: (o := vm(n)) and o["status"].get("phase") == "Stopped" and o,
                           timeout=30, what=f"{guests[key]} Stopped")
            ready = condition(obj, "Ready")
            assert ready["reason"] == reason and hosts[0] in ready["message"], ready
            assert obj["status"]["placement"]["host"] == hosts[0]

        # A controller crash now changes nothing: the host stays Down, nothing is placed again.
        controller.restart(kill=True)
        wait_for(lambda: controller.log().count("reconciling with") == 2, timeout=60, what="the controller back")
        time.sleep(8)
        assert cloud.get("hosts", hosts[0])["status"]["state"] == "Down"
        assert len(history[guests["ha"]]) == 2 and phase(guests["ha"]) == "Running", history

        # 3. host-0 comes back: Up, and it does not start the moved guest.
        set_faults(cloud, hosts[0], None)
        wait_for(lambda: cloud.get("hosts", hosts[0]).get("status", {}).get("state") == "Up", timeout=60,
                 what=f"{hosts[0]} Up again")
        time.sleep(6)  # a few agent resyncs
        assert phase(guests["ha"]) == "Running" and placed(guests["ha"]) != hosts[0]
    finally:
        stop.set()
        watcher.join(5)
    assert len(history[guests["ha"]]) == 2, history  # exactly one placement change
    assert history[guests["plain"]] == [hosts[0]] and history[guests["halocal"]] == [hosts[0]], history
    records = agent.log_records()
    uid = vm(guests["ha"])["metadata"]["uid"]
    starts = [r for r in records if r.get("msg") == "domain started" and r.get("uuid") == uid]
    assert [r.get("host") for r in starts] == [hosts[0], placed(guests["ha"])], starts
    fenced = [r for r in records if r.get("msg") == "fenced: HA guest's domain destroyed" and r.get("uuid") == uid]
    assert fenced and fenced[0]["host"] == hosts[0]


def set_faults(cloud: Cloud, host: str, faults: dict | None) -> None:
    value = json.dumps(faults) if faults is not None else None
    cloud.patch("hosts", host, {"metadata": {"annotations": {SIMULATOR_FAULTS_ANNOTATION: value}}})
