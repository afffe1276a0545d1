"""The host agent with the libvirt driver, against a private libvirtd and the real apiserver."""

from __future__ import annotations

import datetime
import os
import re
import time
from pathlib import Path

import libvirt
import pytest
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

pytest.register_assert_rewrite("conftest_libvirt")
from conftest_libvirt import Cloud, audit_writes, unique, wait_for  # noqa: E402

from privateplane import private_plane_fixtures  # noqa: E402

pytest_plugins = ["conftest_libvirt"]
# The test writes what the controller owns (the Host's status.zone); the session controller would take it back.
control_plane, kube, system_namespace = private_plane_fixtures()


@pytest.fixture
def bridge() -> str:
    """A real Linux bridge with a unique name in the agent's (root) network namespace."""
    name = unique("cmb")[:15]
    with IPRoute() as ipr:
        try:
            ipr.link("add", ifname=name, kind="bridge")
        except NetlinkError as error:
            pytest.skip(reason=f"cannot create a bridge here (needs CAP_NET_ADMIN): {error}")
    yield name
    with IPRoute() as ipr:
        for index in ipr.link_lookup(ifname=name):
            ipr.link("del", index=index)


def renew_time(cloud: Cloud, host: str) -> datetime.datetime | None:
    lease = cloud.lease(host)
    return lease.spec.renew_time if lease is not None else None


def test_libvirt_host_reports_real_facts_storage_bridges_and_heartbeats(
        control_plane, system_namespace, cloud: Cloud, agents, libvirtd, bridge, tmp_path: Path) -> None:
    host, cluster, zone = unique("kvm"), unique("cl"), unique("zone")
    missing_bridge = unique("nobr")[:15]
    cloud.create("hosts", host, {"cluster": cluster})
    local, shared, store = tmp_path / "local-pool", tmp_path / "not-mounted", tmp_path / "store"
    store.mkdir()
    pools = {
        "local": unique("local"), "shared": unique("shared"), "ceph": unique("ceph"), "elsewhere": unique("other"),
    }
    cloud.create("storagepools", pools["local"], {"zone": zone, "scope": "Host", "type": "Filesystem",
                                                  "host": host, "path": str(local)})
    cloud.create("storagepools", pools["shared"], {"zone": zone, "scope": "Zone", "type": "SharedMountPoint",
                                                   "path": str(shared)})
    cloud.create("storagepools", pools["ceph"], {"zone": zone, "scope": "Cluster", "type": "RBD", "cluster": cluster,
                                                 "rbd": {"monitors": ["192.0.2.9:6789"], "pool": "rbd",
                                                         "secretRef": {"namespace": "cumulo-system", "name": "ceph",
                                                                       "key": "key"}}})
    cloud.create("storagepools", pools["elsewhere"], {"zone": unique("zone"), "scope": "Zone",
                                                      "type": "SharedMountPoint", "path": "/elsewhere"})
    store_name = unique("store")
    cloud.create("imagestores", store_name, {"zone": zone, "path": str(store)})
    cloud.create("physicalnetworks", unique("pnet"), {"zone": zone, "trafficTypes": [
        {"type": "Guest", "label": bridge}, {"type": "Management", "label": missing_bridge}]})

    agent = agents.start(host, "--host", host, "--libvirt-uri", libvirtd.uri, "--heartbeat-interval", "1",
                         "--lease-duration", "10", "--log-level", "debug")

    # Before the controller places the host in a zone, only its own Host-scoped pool is checked.
    node = wait_for(lambda: cloud.node(host), what="status.node")
    connection = libvirt.open(libvirtd.uri)
    try:
        lib_version = connection.getLibVersion()
        cpus = connection.getInfo()[2]
    finally:
        connection.close()
    assert node["hypervisorType"] == "KVM"
    assert node["virtType"] == "qemu"  # configuration, not libvirt's advertised kvm
    assert node["hypervisorHealthy"] is True and node["message"] == ""
    assert re.fullmatch(r"\d+\.\d+\.\d+", node["libvirtVersion"])
    assert node["libvirtVersion"] == f"{lib_version // 1000000}.{lib_version // 1000 % 1000}.{lib_version % 1000}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", node["hypervisorVersion"])
    assert node["cpuCores"] == cpus > 0
    assert node["memoryMiB"] > 0 and node["cpuSpeedMHz"] > 0 and node["cpuSockets"] >= 1
    assert node["cpuModel"] and node["architecture"] == os.uname().machine
    assert node["kernelVersion"] == os.uname().release
    assert list(node["storagePools"]) == [pools["local"]]
    assert node["imageStores"] == {} and node["bridges"] == {}
    local_report = node["storagePools"][pools["local"]]
    assert local_report["reachable"] is True and local_report["capacityBytes"] > 0
    assert 0 <= local_report["usedBytes"] <= local_report["capacityBytes"]
    assert local.is_dir()  # local storage of the host: created by the agent

    # The controller fills in the zone; the zone's and cluster's pools, stores and bridges follow.
    cloud.patch_status("hosts", host, {"zone": zone})
    node = wait_for(lambda: (n := cloud.node(host)) and n["bridges"] and n, what="zone-wide report")
    assert set(node["storagePools"]) == {pools["local"], pools["shared"], pools["ceph"]}
    assert node["storagePools"][pools["shared"]] == {
        "reachable": False, "message": f"directory {shared} does not exist"}
    assert not shared.exists()  # a missing shared mount never becomes a local directory
    assert node["storagePools"][pools["ceph"]] == {
        "reachable": False, "message": "Ceph key Secret cumulo-system/ceph does not exist"}
    assert node["imageStores"][store_name]["reachable"] is True
    assert node["imageStores"][store_name]["capacityBytes"] > 0
    assert node["bridges"] == {bridge: True, missing_bridge: False}

    # Heartbeat: the Lease is renewed every interval.
    lease = cloud.lease(host)
    assert lease.metadata.labels == {"cumulo.io/heartbeat": host, "cumulo.io/host": host}
    assert lease.spec.holder_identity == host and lease.spec.lease_duration_seconds == 10
    first = lease.spec.renew_time
    wait_for(lambda: (renew_time(cloud, host) or first) > first + datetime.timedelta(seconds=1.5), timeout=5,
             what="two more renewals")

    # Steady state: one Lease write per interval and no status writes while nothing changes.
    since = time.time()
    time.sleep(4)
    writes = audit_writes(control_plane, agent.user, since, time.time())
    assert writes.get("hosts/status", 0) == 0, writes
    assert 3 <= writes.get("leases", 0) <= 5, writes

    # What the agent sees changes: the report follows within a check interval.
    with IPRoute() as ipr:
        ipr.link("del", index=ipr.link_lookup(ifname=bridge)[0])
    wait_for(lambda: cloud.node(host)["bridges"][bridge] is False, timeout=5, what="the bridge reported gone")
    cloud.delete("storagepools", pools["ceph"])  # a pool that is gone leaves the report (merge-patch null)
    wait_for(lambda: pools["ceph"] not in cloud.node(host)["storagePools"], timeout=5, what="the pool removed")
    shared.mkdir()
    wait_for(lambda: cloud.node(host)["storagePools"][pools["shared"]]["reachable"], timeout=5,
             what="the shared mount reported reachable")

    # libvirtd goes away: the host reports an unhealthy hypervisor, and recovers when it is back.
    libvirtd.stop()
    node = wait_for(lambda: (n := cloud.node(host)) and n["hypervisorHealthy"] is False and n, timeout=10,
                    what="hypervisorHealthy false")
    assert "cannot connect to libvirt" in node["message"] or "libvirt" in node["message"]
    assert node["cpuCores"] == cpus  # the last known facts stay
    libvirtd.start()
    node = wait_for(lambda: (n := cloud.node(host)) and n["hypervisorHealthy"] and n, timeout=10,
                    what="hypervisorHealthy true again")
    assert node["message"] == ""
    assert agent.alive()
