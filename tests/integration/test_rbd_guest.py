"""RBD primary storage end to end: the controller, a real agent on a private libvirtd (QEMU/TCG) and a real
single-node Ceph (conftest_ceph; this test's own Ceph pool and client).

A Zone-scoped RBD StoragePool with its key in a Secret: the agent reports Ceph's capacity and its reachability;
the tiny guest boots from a copy-on-write clone of the template's RBD image through a libvirt network disk, and
its disk writes survive a stop/start; a volume the pool cannot take is refused with a reason; deleting the
template is blocked while the clone lives, and once the guest is gone, so are the template's RBD image and
snapshot; a wrong key makes the pool unreachable with Ceph's message. A guest or a volume the pool cannot take
is refused with the reason.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

pytest.register_assert_rewrite("conftest_libvirt", "conftest_ceph")
from conftest_ceph import CephPool  # noqa: E402
from conftest_libvirt import Cloud, unique, wait_for  # noqa: E402
from libvirtcloud import Namespaced, console_wait, create_rbd_pool, line, wait_phase  # noqa: E402

from cumulo import guestimage  # noqa: E402

pytest_plugins = ["conftest_libvirt", "conftest_ceph"]
pytestmark = [pytest.mark.usefixtures("controller", "system_namespace"), pytest.mark.timeout(400)]

GIB = 1024**3


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


def rbd_images(pool: CephPool) -> list[str]:
    return sorted(pool.cluster.run("rbd", "ls", "-p", pool.name).split())


def test_guest_boots_from_an_rbd_clone_and_template_deletion_waits_for_it(
        cloud: Cloud, kube, control_plane, agents, libvirtd, guest, ceph_pool: CephPool, tmp_path,
        record_property) -> None:
    zone, pod, cluster, host = unique("zone"), unique("pod"), unique("kvm"), unique("kvmhost")
    cloud.create("zones", zone, {"networkType": "Advanced", "dns1": "192.0.2.53"})
    cloud.create("hostpods", pod, {"zone": zone, "cidr": "10.252.0.0/24", "gateway": "10.252.0.1",
                                   "startIp": "10.252.0.10", "endIp": "10.252.0.20"})
    cloud.create("clusters", cluster, {"pod": pod, "hypervisorType": "KVM", "cpuOvercommitRatio": 4.0})
    cloud.create("hosts", host, {"cluster": cluster})
    core = client.CoreV1Api(kube)
    pool, secret = create_rbd_pool(cloud, kube, ceph_pool, zone)
    store_path = tmp_path / "store"
    store_path.mkdir()
    cloud.create("imagestores", unique("store"), {"zone": zone, "type": "Filesystem", "path": str(store_path)})
    offering = unique("tiny")
    cloud.create("serviceofferings", offering, {"cpuNumber": 1, "cpuSpeedMHz": 500, "memoryMiB": 128,
                                                "storageType": "shared"})
    namespace = unique("tenant")
    control_plane.kubectl("create", "namespace", namespace)
    objects = Namespaced(kube, namespace)
    state_dir = tmp_path / "state"
    agents.start(host, "--host", host, "--libvirt-uri", libvirtd.uri, "--network-driver", "simulator",
                 "--heartbeat-interval", "1", "--lease-duration", "5", "--state-dir", str(state_dir),
                 "--stop-timeout", "30", "--log-level", "debug", "--log-format", "text")

    # -- The pool: reachable from the host, capacity from Ceph ---------------------------------------
    status = wait_for(lambda: (s := cloud.get("storagepools", pool).get("status") or {}).get("state") == "Up" and s,
                      timeout=60, what="the RBD pool Up")
    assert status["hostAccess"][host]["reachable"] is True
    df = ceph_pool.cluster.ceph_json("df")
    max_avail = next(p["stats"]["max_avail"] for p in df["pools"] if p["name"] == ceph_pool.name)
    assert status["capacityBytes"] >= max_avail * 0.9  # Ceph's own figure (it moves a little with use)
    assert 0 < status["capacityBytes"] < 64 * GIB

    # -- A volume the pool cannot take is refused, with the reason -----------------------------------
    objects.create("volumes", "Volume", "huge", {"zone": zone, "storagePool": pool, "sizeGiB": 1000})
    ready = wait_for(lambda: (c := condition(objects.status("volumes", "huge"), "Ready")).get("reason") ==
                     "InsufficientCapacity" and c, timeout=30, what="the huge volume refused")
    assert f"StoragePool {pool} cannot take 1000 GiB" in ready["message"] and "GiB free" in ready["message"]
    assert objects.status("volumes", "huge").get("path") is None  # never handed to an agent
    objects.delete("volumes", "huge")

    # -- Template, then a guest booting from a clone of its RBD image ---------------------------------
    objects.create("templates", "Template", "tiny", {
        "url": guest.disk.as_uri(), "format": "QCOW2", "zone": zone, "checksum": f"sha256:{guest.disk_sha256}",
        "directKernelBoot": {
            "kernel": {"url": guest.kernel.as_uri(), "checksum": f"sha256:{guest.kernel_sha256}"},
            "initrd": {"url": guest.initrd.as_uri(), "checksum": f"sha256:{guest.initrd_sha256}"},
            "cmdline": guest.cmdline}})
    template = wait_for(lambda: (t := objects.get("templates", "tiny")) and (t.get("status") or {}).get("state")
                        == "Ready" and t, timeout=60, what="template Ready")
    # A guest whose root disk the pool cannot take: the planner refuses it, saying so.
    objects.create("virtualmachines", "VirtualMachine", "big", {
        "serviceOffering": offering, "template": {"name": "tiny"}, "zone": zone, "rootDiskSizeGiB": 1000})
    refused = wait_for(lambda: (c := condition(objects.status("virtualmachines", "big"), "Scheduled")).get("reason")
                       == "InsufficientCapacity" and c, timeout=30, what="the big guest refused")
    assert "short of primary storage" in refused["message"] and "1000 GiB" in refused["message"], refused
    objects.delete("virtualmachines", "big")
    wait_for(lambda: objects.get("virtualmachines", "big") is None, timeout=30, what="the big guest gone")

    started = time.monotonic()
    objects.create("virtualmachines", "VirtualMachine", "vm1", {
        "serviceOffering": offering, "template": {"name": "tiny"}, "zone": zone, "expungeDelaySeconds": 1})
    vm = wait_phase(objects, "vm1", "Running", timeout=120)
    record_property("rbd_create_to_running_s", round(time.monotonic() - started, 1))
    print(f"RBD guest: create -> Running {time.monotonic() - started:.1f}s (template import + clone included)")
    root = objects.status("volumes", "vm1-root")
    template_uid = template["metadata"]["uid"]
    root_uid = objects.get("volumes", "vm1-root")["metadata"]["uid"]
    assert root["storagePool"] == pool and root["format"] == "raw"
    assert root["path"] == f"volume-{root_uid}"
    assert root["baseImage"]["path"] == f"template-{template_uid}@base"
    assert root["rbd"]["pool"] == ceph_pool.name
    assert root["node"]["exists"] is True and root["node"]["sizeBytes"] == guest.disk_virtual_size
    # In Ceph: the template image with its protected snapshot, and the root disk a clone of it.
    assert rbd_images(ceph_pool) == sorted([f"template-{template_uid}", f"volume-{root_uid}"])
    children = ceph_pool.cluster.run("rbd", "children", f"{ceph_pool.name}/template-{template_uid}@base")
    assert children.split() == [f"{ceph_pool.name}/volume-{root_uid}"]
    assert "true" in ceph_pool.cluster.run("rbd", "snap", "ls", f"{ceph_pool.name}/template-{template_uid}",
                                           "--format", "json").replace('"protected":"true"', "true")
    # libvirt runs it from a network disk with the Ceph secret.
    import libvirt

    connection = libvirt.open(libvirtd.uri)
    try:
        xml = connection.lookupByUUIDString(vm["node"]["domainUuid"]).XMLDesc(0)
        secrets = [s.UUIDString() for s in connection.listAllSecrets()]
    finally:
        connection.close()
    assert f"<source protocol='rbd' name='{ceph_pool.name}/volume-{root_uid}'" in xml, xml
    assert "type='ceph'" in xml and len(secrets) == 1 and secrets[0] in xml

    console = vm["node"]["consoleLog"]
    console_wait(console, line(guestimage.BOOT_MARKER))
    record_property("rbd_create_to_boot_marker_s", round(time.monotonic() - started, 1))
    print(f"RBD guest: create -> boot marker {time.monotonic() - started:.1f}s")
    console_wait(console, line(f"{guestimage.BOOT_COUNT_PREFIX}1"), 10)  # written to its RBD disk
    console_wait(console, line(guestimage.READY_MARKER), 60)

    # -- Stop and start: what the guest wrote to its RBD disk is still there ---------------------------
    objects.patch("virtualmachines", "vm1", {"spec": {"state": "Stopped"}})
    wait_phase(objects, "vm1", "Stopped", timeout=90)
    offset = len(Path(console).read_text(errors="replace"))
    objects.patch("virtualmachines", "vm1", {"spec": {"state": "Running"}})
    wait_phase(objects, "vm1", "Running", timeout=90)
    console_wait(console, line(f"{guestimage.BOOT_COUNT_PREFIX}2"), after=offset)

    # -- The template cannot go while its clone lives ---------------------------------------------------
    objects.delete("templates", "tiny")
    blocked = wait_for(lambda: (c := condition(objects.status("templates", "tiny"), "DeletionBlocked"))
                       .get("status") == "True" and c, timeout=30, what="template deletion blocked")
    assert "Volume" in blocked["message"] and "vm1-root" in blocked["message"], blocked
    assert f"RBD clone of template-{template_uid}@base" in blocked["message"], blocked
    assert f"template-{template_uid}" in rbd_images(ceph_pool)

    # -- The guest goes: its clone, then the template with its RBD image and snapshot ------------------
    objects.patch("virtualmachines", "vm1", {"spec": {"state": "Destroyed"}})
    wait_for(lambda: objects.get("virtualmachines", "vm1") is None, timeout=90, what="vm1 expunged")
    wait_for(lambda: objects.get("volumes", "vm1-root") is None, timeout=60, what="the root volume gone")
    wait_for(lambda: objects.get("templates", "tiny") is None, timeout=60, what="the template deleted")
    assert rbd_images(ceph_pool) == []

    # -- A wrong key: unreachable, with Ceph's message ------------------------------------------------
    other_key = ceph_pool.cluster.run("ceph-authtool", "--gen-print-key").strip()
    core.patch_namespaced_secret(secret, "cumulo-system",
                                 {"data": {"key": base64.b64encode(other_key.encode()).decode()}})
    access = wait_for(lambda: not (a := cloud.get("storagepools", pool)["status"]["hostAccess"][host])["reachable"]
                      and a, timeout=150, what="the pool unreachable with the wrong key")
    assert "error connecting to the cluster" in access["message"], access
    assert cloud.get("storagepools", pool)["status"]["state"] == "Error"
    cloud.delete("storagepools", pool)
