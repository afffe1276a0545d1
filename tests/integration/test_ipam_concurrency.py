"""IPAM under load: 200 guests started at once on one /24 get 200 distinct addresses (the controller is restarted
in the middle of it), and a network with too few addresses says so on the guests that cannot have one."""

from __future__ import annotations

import collections
import time
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

pytest.register_assert_rewrite("conftest_libvirt")
from conftest_libvirt import Cloud, unique, wait_for  # noqa: E402
from simzone import create_sim_zone  # noqa: E402

pytest_plugins = ["conftest_libvirt"]
pytestmark = [pytest.mark.usefixtures("system_namespace"), pytest.mark.timeout(400)]

GROUP, VERSION = "cumulo.io", "v1alpha1"


def test_two_hundred_concurrent_nics_in_one_slash_24_and_exhaustion(cloud: Cloud, kube, control_plane, agents,
                                                                     controller) -> None:
    custom = client.CustomObjectsApi(kube)
    base = unique("iphost")
    hosts = [f"{base}-{i}" for i in range(10)]
    zone, cluster = create_sim_zone(cloud, hosts, "10.252.0")
    cloud.create("physicalnetworks", unique("pnet"), {"zone": zone, "isolationMethod": "VXLAN",
                                                      "vnetRanges": [{"start": 100, "end": 199}],
                                                      "trafficTypes": [{"type": "Guest", "label": "cloudbr0"}]})
    offering, plain = unique("tiny"), unique("plain")
    cloud.create("serviceofferings", offering, {"cpuNumber": 1, "memoryMiB": 128, "storageType": "local"})
    # A shared network without services: IPAM only, no router to wait for.
    cloud.create("networkofferings", plain, {"guestIpType": "Shared"})
    namespace = unique("tenant")
    control_plane.kubectl("create", "namespace", namespace)
    agents.start(base, "--host", base, "--hypervisor", "simulator", "--simulate", "10", "--register-cluster", cluster,
                 "--sim-cpus", "64", "--sim-memory-mib", "65536", "--heartbeat-interval", "2", "--lease-duration", "10")
    for host in hosts:
        wait_for(lambda h=host: (cloud.get("hosts", h).get("status") or {}).get("state") == "Up", timeout=60,
                 what=f"{host} Up")

    def create(plural: str, kind: str, name: str, spec: dict[str, Any]) -> None:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name, "namespace": namespace},
            "spec": spec})

    def vms() -> list[dict[str, Any]]:
        return custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "virtualmachines")["items"]

    create("templates", "Template", "img", {"url": "file:///sim/images/img.qcow2", "format": "QCOW2", "zone": zone,
                                            "hypervisor": "Simulator"})
    create("networks", "Network", "big", {"networkOffering": plain, "zone": zone, "cidr": "10.60.0.0/24",
                                          "gateway": "10.60.0.1"})
    create("networks", "Network", "small", {"networkOffering": plain, "zone": zone, "cidr": "10.61.0.0/28",
                                            "gateway": "10.61.0.1"})
    started = time.monotonic()
    for index in range(200):
        create("virtualmachines", "VirtualMachine", f"vm{index:03d}", {
            "serviceOffering": offering, "template": {"name": "img"}, "zone": zone,
            "nics": [{"network": {"name": "big"}}]})
        if index == 100:
            controller.restart()  # a crash in the middle of the allocations: the pools are rebuilt from the objects

    def addressed() -> int:
        return sum(1 for vm in vms() if (vm.get("status") or {}).get("nics") and vm["status"]["nics"][0].get(
            "ipAddress"))

    wait_for(lambda: addressed() == 200, timeout=240, interval=1, what="200 addressed NICs")
    elapsed = time.monotonic() - started
    addresses = collections.Counter(vm["status"]["nics"][0]["ipAddress"] for vm in vms())
    duplicates = {a: n for a, n in addresses.items() if n > 1}
    assert not duplicates, f"duplicate addresses: {duplicates}"
    assert all(a.startswith("10.60.0.") and a not in ("10.60.0.0", "10.60.0.1", "10.60.0.255") for a in addresses)
    macs = collections.Counter(vm["status"]["nics"][0]["macAddress"] for vm in vms())
    assert len(macs) == 200
    big = wait_for(lambda: (s := custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "networks", "big")[
        "status"]).get("ipsAllocated") == 200 and s, timeout=30, what="the network counting 200 addresses")
    assert big["ipsTotal"] == 253
    print(f"200 NICs addressed in {elapsed:.1f}s (controller restarted after the 101st)")

    # /28: 13 addresses for guests (the gateway is reserved); 16 guests → 3 told why they cannot start.
    for index in range(16):
        create("virtualmachines", "VirtualMachine", f"small{index:02d}", {
            "serviceOffering": offering, "template": {"name": "img"}, "zone": zone, "state": "Stopped",
            "nics": [{"network": {"name": "small"}}]})

    def starved() -> list[str]:
        names = []
        for vm in vms():
            conditions = {c["type"]: c for c in (vm.get("status") or {}).get("conditions", [])}
            ready = conditions.get("NetworkReady")
            if vm["metadata"]["name"].startswith("small") and ready and ready["reason"] == \
                    "InsufficientAddressCapacity":
                names.append(vm["metadata"]["name"])
        return names

    wait_for(lambda: len(starved()) == 3, timeout=60, what="3 guests without an address")
    small = [vm for vm in vms() if vm["metadata"]["name"].startswith("small")]
    given = [vm["status"]["nics"][0].get("ipAddress") for vm in small if vm["status"]["nics"][0].get("ipAddress")]
    assert len(given) == len(set(given)) == 13
    try:
        example = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "virtualmachines", starved()[0])
    except ApiException:
        raise
    ready = {c["type"]: c for c in example["status"]["conditions"]}["NetworkReady"]
    assert "no address on network" in ready["message"] and "13" in ready["message"], ready
