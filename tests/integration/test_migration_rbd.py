"""Live migration of a real guest on RBD (shared storage: memory only): two private libvirtds in the machine's own
network namespace (each its own mount namespace, listening for migration peers on its own loopback address,
127.0.0.2 and 127.0.0.3, so QEMU reaches the private Ceph on 127.0.0.1 from both), their agents, the controller and
a single-node Ceph. The tiny guest boots from an RBD clone on one host and moves to the other: the target's agent
defines the Ceph secret before the domain lands, the disk stays where it is (no block copy), the domain runs on
the target only and the guest does not boot again there; its writes before the move are on the disk after it."""

from __future__ import annotations

import time
from pathlib import Path

import libvirt
import pytest

pytest.register_assert_rewrite("conftest_libvirt", "conftest_ceph")
from conftest_ceph import CephPool  # noqa: E402
from conftest_libvirt import Cloud, unique, wait_for  # noqa: E402
from libvirtcloud import Namespaced, console_wait, create_rbd_pool, line, wait_phase  # noqa: E402

from cumulo import guestimage  # noqa: E402

pytest_plugins = ["conftest_libvirt", "conftest_ceph"]
pytestmark = [pytest.mark.usefixtures("controller", "system_namespace"), pytest.mark.timeout(400)]


def active_uuids(uri: str) -> set[str]:
    connection = libvirt.open(uri)
    try:
        return {d.UUIDString() for d in connection.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}
    finally:
        connection.close()


def test_live_migration_of_a_guest_on_rbd(cloud: Cloud, kube, control_plane, agents, libvirtd_factory, guest,
                                          ceph_pool: CephPool, tmp_path: Path) -> None:
    zone, pod, cluster = unique("zone"), unique("pod"), unique("kvm")
    cloud.create("zones", zone, {"networkType": "Advanced", "dns1": "192.0.2.53"})
    cloud.create("hostpods", pod, {"zone": zone, "cidr": "10.251.0.0/24", "gateway": "10.251.0.1",
                                   "startIp": "10.251.0.10", "endIp": "10.251.0.20"})
    cloud.create("clusters", cluster, {"pod": pod, "hypervisorType": "KVM", "cpuOvercommitRatio": 4.0})
    pool, _secret = create_rbd_pool(cloud, kube, ceph_pool, zone)
    store = tmp_path / "store"
    store.mkdir()
    cloud.create("imagestores", unique("store"), {"zone": zone, "type": "Filesystem", "path": str(store)})
    offering = unique("tiny")
    cloud.create("serviceofferings", offering, {"cpuNumber": 1, "cpuSpeedMHz": 500, "memoryMiB": 128,
                                                "storageType": "shared"})
    namespace = unique("tenant")
    control_plane.kubectl("create", "namespace", namespace)
    objects = Namespaced(kube, namespace)
    hosts, daemons = [], {}
    for index, address in enumerate(("127.0.0.2", "127.0.0.3")):
        host = f"{cluster}-h{index}"
        cloud.create("hosts", host, {"cluster": cluster})
        daemons[host] = libvirtd_factory(listen=address)
        agents.start(host, "--host", host, "--libvirt-uri", daemons[host].uri, "--network-driver", "simulator",
                     "--private-ip", address, "--heartbeat-interval", "1", "--lease-duration", "5",
                     "--state-dir", str(tmp_path / f"state{index}"), "--vm-resync", "2")
        hosts.append(host)
    wait_for(lambda: all((cloud.get("hosts", h).get("status") or {}).get("state") == "Up" for h in hosts),
             timeout=60, what="hosts Up")
    wait_for(lambda: (cloud.get("storagepools", pool).get("status") or {}).get("state") == "Up", timeout=60,
             what="the RBD pool Up")
    objects.create("templates", "Template", "tiny", {
        "url": guest.disk.as_uri(), "format": "QCOW2", "zone": zone, "checksum": f"sha256:{guest.disk_sha256}",
        "directKernelBoot": {"kernel": {"url": guest.kernel.as_uri()}, "initrd": {"url": guest.initrd.as_uri()},
                             "cmdline": guest.cmdline}})
    wait_for(lambda: (objects.status("templates", "tiny")).get("state") == "Ready", timeout=60, what="template")
    objects.create("virtualmachines", "VirtualMachine", "vm1", {
        "serviceOffering": offering, "template": {"name": "tiny"}, "zone": zone})
    vm = wait_phase(objects, "vm1", "Running", timeout=120)
    source = vm["placement"]["host"]
    target = next(h for h in hosts if h != source)
    console_wait(vm["node"]["consoleLog"], line(guestimage.READY_MARKER), timeout=240)
    root_before = objects.status("volumes", "vm1-root")

    started = time.monotonic()
    objects.create("virtualmachinemigrations", "VirtualMachineMigration", "move", {"virtualMachine": {"name": "vm1"}})
    done = wait_for(lambda: (s := objects.status("virtualmachinemigrations", "move")).get("phase")
                    in ("Succeeded", "Failed") and s, timeout=180, interval=0.5, what="the migration ends")
    assert done["phase"] == "Succeeded", done
    took = time.monotonic() - started
    assert done.get("plan", {}).get("disks", []) == []  # shared storage: memory only
    moved = wait_for(lambda: (s := objects.status("virtualmachines", "vm1")).get("phase") == "Running"
                     and (s.get("node") or {}).get("host") == target and s, timeout=60, what="vm1 on the target")
    uid = objects.get("virtualmachines", "vm1")["metadata"]["uid"]
    assert uid in active_uuids(daemons[target].uri) and uid not in active_uuids(daemons[source].uri)
    root = objects.status("volumes", "vm1-root")
    assert (root["storagePool"], root["path"]) == (root_before["storagePool"], root_before["path"])
    # No second boot on the target: its console (prepared by the target's agent) never shows the boot marker.
    console = Path(moved["node"]["consoleLog"])
    time.sleep(3)
    assert guestimage.BOOT_MARKER not in console.read_text(errors="replace")
    print(f"RBD live migration {source} -> {target}: {took:.1f}s ({done['message']})")
