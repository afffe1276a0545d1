"""VM high availability without split brain, on simulated hosts (one agent process, three hosts sharing an
in-memory storage heartbeat "pool"; a controller of the module's own with short HA timings).

1. host-0 stops renewing its Lease but keeps writing its storage heartbeat: neighbours read it fresh, the host is
   Alert and nothing moves, well past the Down threshold.
2. It stops writing its storage heartbeat too: its agent fences itself (destroys the HA guest's domain), the
   neighbours read the heartbeat stale, the host is Down; the HA guest on shared storage is placed on another host
   exactly once and runs there; the non-HA guest and the HA guest on local storage stay, stopped, with reasons.
   A controller crash then changes nothing (the host stays Down, no guest is placed again).
3. host-0 comes back: Up again, and its agent does not start the moved guest (a direct GET first).

A second test freezes the suspect's agent (SIGSTOP) so it cannot fence: once thawed, its sweep destroys the stale domain
of the guest now running elsewhere, keeps the disk, and writes nothing stale over the new owner's status.
"""

from __future__ import annotations

import json
import os
import signal
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


def test_returning_host_destroys_its_stale_domain(control_plane, system_namespace, cloud: Cloud, agents,
                                                  tmp_path) -> None:
    """The suspect's agent is frozen (SIGSTOP): it renews no Lease, writes no storage heartbeat and cannot fence,
    so its HA guest's domain still runs when the host is found Down and the guest restarted elsewhere. Thawed
    (SIGCONT), its agent must destroy that stale domain (the sweep's direct GET sees the guest placed elsewhere),
    keep the disk, and never report the guest as its own: status.node stays the new owner's.
    The suspect runs in an agent process of its own (hosts of one process share their in-memory heartbeat pool;
    the others' process reads no heartbeat of it, as of a host that writes none)."""
    controller = CumuloProcess("controller", [
        console_script("cumulo-controller"), "--kubeconfig", str(control_plane.admin_kubeconfig),
        "--metrics-port", "0", "--host-alert-after", "300", "--host-down-after", str(DOWN_AFTER)],
        tmp_path / "controller.log")
    suspect_agent = None
    try:
        controller.wait_for_log("reconciling with", timeout=60)
        custom = cloud.custom
        zone, pod, cluster = unique("zone"), unique("pod"), unique("ha")
        old_base, new_base = unique("stale"), unique("fresh")
        old, others = f"{old_base}-0", [f"{new_base}-0", f"{new_base}-1"]
        cloud.create("zones", zone, {"networkType": "Advanced", "dns1": "192.0.2.53"})
        cloud.create("hostpods", pod, {"zone": zone, "cidr": "10.252.1.0/24", "gateway": "10.252.1.1",
                                       "startIp": "10.252.1.10", "endIp": "10.252.1.20"})
        cloud.create("clusters", cluster, {"pod": pod, "hypervisorType": "Simulator"})
        shared = unique("nfs")
        cloud.create("storagepools", shared, {"zone": zone, "scope": "Cluster", "cluster": cluster,
                                              "type": "SharedMountPoint", "path": f"/sim/{shared}"})
        for host in (old, *others):
            cloud.create("hosts", host, {"cluster": cluster, "allocationState": "Enabled" if host == old
                                         else "Disabled"})
        cloud.create("imagestores", unique("store"), {"zone": zone, "type": "Filesystem", "path": "/sim/images"})
        offering = unique("ha")
        cloud.create("serviceofferings", offering, {"cpuNumber": 1, "cpuSpeedMHz": 1000, "memoryMiB": 256,
                                                    "storageType": "shared", "offerHA": True})
        namespace = unique("tenant")
        control_plane.kubectl("create", "namespace", namespace)
        common = ("--hypervisor", "simulator", "--sim-cpus", "8", "--sim-memory-mib", "8192", "--sim-persist",
                  "--heartbeat-interval", "1", "--lease-duration", "4", "--storage-heartbeat-interval", "1",
                  "--fence-after", str(FENCE_AFTER), "--vm-resync", "2", "--orphan-sweep", "3")
        suspect_agent = agents.start(old_base, "--host", old_base, "--simulate", "1",
                                     "--state-dir", str(tmp_path / old_base), *common)
        agents.start(new_base, "--host", new_base, "--simulate", "2", "--state-dir", str(tmp_path / new_base),
                     *common)
        for host in (old, *others):
            wait_for(lambda h=host: (cloud.get("hosts", h).get("status") or {}).get("state") == "Up", timeout=60,
                     what=f"{host} Up")

        def get(plural: str, name: str) -> dict[str, Any]:
            return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)

        def simulated(host: str, base: str) -> dict[str, Any]:
            """The simulated host's domains (by uuid) and disks, as its agent last saved them."""
            try:
                data = json.loads((tmp_path / base / "simulator" / f"{host}.json").read_text())
            except FileNotFoundError:
                return {"domains": {}, "disks": {}}
            return {"domains": {d["uuid"]: d for d in data.get("domains", [])}, "disks": data.get("disks", {})}

        for plural, kind, name, spec in (
                ("templates", "Template", "img", {"url": "file:///sim/images/img.qcow2", "format": "QCOW2",
                                                  "zone": zone, "hypervisor": "Simulator"}),
                ("virtualmachines", "VirtualMachine", "guest", {"serviceOffering": offering,
                                                                "template": {"name": "img"}, "zone": zone})):
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name, "namespace": namespace},
                "spec": spec})
        vm = wait_for(lambda: (o := get("virtualmachines", "guest")).get("status", {}).get("phase") == "Running"
                      and (o["status"].get("node") or {}).get("domainState") == "running" and o,
                      timeout=90, what="the guest Running")
        uid = vm["metadata"]["uid"]
        assert vm["status"]["placement"]["host"] == old
        volumes = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "volumes")["items"]
        assert len(volumes) == 1, [v["metadata"]["name"] for v in volumes]
        volume, path = volumes[0]["metadata"]["name"], volumes[0]["status"]["path"]
        assert uid in simulated(old, old_base)["domains"] and path in simulated(old, old_base)["disks"]
        for host in others:
            cloud.patch("hosts", host, {"spec": {"allocationState": "Enabled"}})

        # Who the guest's fields name, as often as we can look.
        fields = {"placement": ("placement", "host"), "launch": ("launch", "host"), "node": ("node", "host")}
        history: dict[str, list[str | None]] = {field: [old] for field in fields}
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                try:
                    status = get("virtualmachines", "guest").get("status") or {}
                except Exception:  # noqa: BLE001 - a transient API error; look again
                    continue
                for field, (section, key) in fields.items():
                    host = (status.get(section) or {}).get(key)
                    if host != history[field][-1]:
                        history[field].append(host)
                time.sleep(0.1)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            # Frozen: no Lease, no storage heartbeat, no fencing. The host goes Down with the domain still there.
            frozen = time.monotonic()
            os.kill(suspect_agent.pid, signal.SIGSTOP)
            try:
                wait_for(lambda: cloud.get("hosts", old).get("status", {}).get("state") == "Down", timeout=60,
                         what=f"{old} Down")
                moved = wait_for(lambda: (o := get("virtualmachines", "guest"))["status"].get("phase") == "Running"
                                 and o["status"]["placement"]["host"] in others
                                 and (o["status"].get("node") or {}).get("host") == o["status"]["placement"]["host"]
                                 and o["status"]["node"].get("domainState") == "running" and o,
                                 timeout=60, what="the guest Running on another host")
                new = moved["status"]["placement"]["host"]
                print(f"guest Running on {new} {time.monotonic() - frozen:.1f}s after {old}'s agent froze")
                assert uid in simulated(old, old_base)["domains"], "the frozen host's domain went: nothing to test"
                assert uid in simulated(new, new_base)["domains"]
            finally:
                os.kill(suspect_agent.pid, signal.SIGCONT)
            thawed = time.monotonic()

            # Thawed: the stale domain goes (the disk stays), the host is Up again, the guest stays on the new host.
            wait_for(lambda: uid not in simulated(old, old_base)["domains"], timeout=30,
                     what=f"the stale domain on {old} destroyed")
            print(f"stale domain destroyed {time.monotonic() - thawed:.1f}s after the thaw")
            wait_for(lambda: cloud.get("hosts", old).get("status", {}).get("state") == "Up", timeout=60,
                     what=f"{old} Up again")
            time.sleep(6)  # a few resyncs and a sweep of the returned agent
            assert uid not in simulated(old, old_base)["domains"]
            assert path in simulated(old, old_base)["disks"], "the returned host deleted the guest's disk"
            assert uid in simulated(new, new_base)["domains"], "the new owner's domain went"
        finally:
            stop.set()
            watcher.join(5)
        vm = get("virtualmachines", "guest")
        assert vm["status"]["phase"] == "Running" and vm["status"]["placement"]["host"] == new
        assert vm["status"]["node"]["host"] == new and vm["status"]["node"]["domainState"] == "running"
        # Each field left the old host for the new one and never named the old host again: the returned agent
        # wrote nothing stale, the controller placed the guest once.
        assert all(seen[0] == old and seen[-1] == new and old not in seen[1:] for seen in history.values()), history
        assert history["placement"] == [old, new], history
        disk = get("volumes", volume)
        assert disk["status"]["node"]["exists"] is True and not disk["metadata"].get("deletionTimestamp"), disk
        records = suspect_agent.log_records()
        destroyed = [r for r in records if r.get("msg") == "destroying a domain that is not placed here"
                     and r.get("uuid") == uid]
        assert destroyed and f"placed on host {new}" in destroyed[0]["reason"], destroyed
        assert not [r for r in records if r.get("msg") == "fenced: HA guest's domain destroyed"]
        assert [r["host"] for r in records if r.get("msg", "").startswith("heartbeat renewed after the Lease had "
                                                                         "expired")] == [old]
        starts = [r.get("host") for r in records if r.get("msg") == "domain started" and r.get("uuid") == uid]
        assert starts == [old], starts  # the first start only: the returned agent started nothing again
        assert not [r for r in records if r.get("msg") == "disk deleted" and r.get("path") == path]
    finally:
        if suspect_agent is not None and suspect_agent.alive():
            os.kill(suspect_agent.pid, signal.SIGCONT)  # a failed assertion must not leave it stopped
        controller.stop()
