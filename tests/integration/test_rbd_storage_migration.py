"""Storage migration between a directory pool and an RBD pool, and RBD snapshots, end to end: the session
controller, a real agent on a private libvirtd (QEMU/TCG), the tiny guest and a real single-node Ceph
(conftest_ceph; this test's own Ceph pool and client).

The Stopped guest's root volume moves local -> RBD -> local; each time the copy is verified before the switch,
the source is removed after it, the guest boots from the moved disk (its boot counter goes on) and a marker
written below the guest (qemu-io, at the end of the disk) travels with it. On RBD, a Snapshot of the running
guest's disk is an RBD snapshot (crash-consistent) backed up to the image store; deleting it removes both.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

pytest.register_assert_rewrite("conftest_libvirt", "conftest_ceph", "diskmarks")
from conftest_ceph import CephPool  # noqa: E402
from conftest_libvirt import wait_for  # noqa: E402
from diskmarks import holds, write  # noqa: E402
from libvirtcloud import (  # noqa: E402
    Console,
    build_zone,
    condition,
    create_rbd_pool,
    line,
    template_spec,
    wait_backed_up,
    wait_condition,
    wait_phase,
)

from cumulo import guestimage  # noqa: E402
from hostagent.drivers.storage.rbd import RbdAccess  # noqa: E402
from hostagent.drivers.storage.rbdcopies import RbdCopiesDriver  # noqa: E402

pytest_plugins = ["conftest_libvirt", "conftest_ceph"]
pytestmark = [pytest.mark.usefixtures("controller", "system_namespace"), pytest.mark.timeout(600)]


def rbd_images(pool: CephPool) -> list[str]:
    return sorted(pool.cluster.run("rbd", "ls", "-p", pool.name).split())


def test_root_volume_moves_local_to_rbd_and_back_and_rbd_snapshots(
        cloud, kube, control_plane, agents, libvirtd, guest, ceph_pool: CephPool, tmp_path,  # noqa: F811
        record_property) -> None:
    zone, _agent = build_zone(cloud, kube, control_plane, agents, libvirtd, tmp_path)
    objects = zone.objects
    reader = RbdCopiesDriver(RbdAccess(monitors=(ceph_pool.monitor,), pool=ceph_pool.name, user=ceph_pool.user,
                                       key=ceph_pool.key), host="test")
    figures: dict[str, float] = {}
    try:
        objects.create("templates", "Template", "tiny", template_spec(guest, zone.name))
        wait_for(lambda: (objects.get("templates", "tiny") or {}).get("status", {}).get("state") == "Ready",
                 timeout=60, what="template Ready")
        objects.create("virtualmachines", "VirtualMachine", "vm", {
            "serviceOffering": zone.offering, "template": {"name": "tiny"}, "zone": zone.name})
        node = wait_phase(zone, "vm", "Running", timeout=120)["node"]
        Console(node["consoleLog"]).wait(line(f"{guestimage.BOOT_COUNT_PREFIX}1"))
        objects.patch("virtualmachines", "vm", {"spec": {"state": "Stopped"}})
        wait_phase(zone, "vm", "Stopped", timeout=90)
        # The RBD pool comes once the guest's root disk is on the local pool.
        rbd_pool, _secret = create_rbd_pool(cloud, kube, ceph_pool, zone.name)
        wait_for(lambda: (cloud.get("storagepools", rbd_pool).get("status") or {}).get("state") == "Up", timeout=60,
                 what="the RBD pool Up")
        volume = objects.get("volumes", "vm-root")
        uid, source = volume["metadata"]["uid"], volume["status"]["path"]
        assert volume["status"]["storagePool"] == zone.pool and Path(source).is_file()
        size = volume["status"]["node"]["sizeBytes"]
        offset = size - 64 * 1024 * 4
        write("qcow2", source, 0xC1, offset)

        # -- local -> RBD ---------------------------------------------------------------------------------
        started = time.monotonic()
        objects.patch("volumes", "vm-root", {"spec": {"storagePool": rbd_pool}})
        wait_condition(objects, "volumes", "vm-root", "Migrated", "True", timeout=240)
        figures["migrate_local_to_rbd_s"] = time.monotonic() - started
        status = wait_for(lambda: (s := objects.status("volumes", "vm-root")).get("phase") == "Ready" and s,
                          timeout=30, what="volume Ready")
        assert status["storagePool"] == rbd_pool and status["path"] == f"volume-{uid}" and status["format"] == "raw"
        assert status["rbd"]["pool"] == ceph_pool.name and status.get("migration") is None
        assert status.get("baseImage") is None  # a standalone copy, no template clone
        assert not Path(source).exists() and not list(zone.pool_path.glob(f"*{uid}*"))
        assert rbd_images(ceph_pool) == [f"volume-{uid}"]  # no temporary image left
        assert holds("raw", reader.qemu_location(f"volume-{uid}"), 0xC1, offset)
        objects.patch("virtualmachines", "vm", {"spec": {"state": "Running"}})
        node = wait_phase(zone, "vm", "Running", timeout=120)["node"]
        import libvirt

        connection = libvirt.open(libvirtd.uri)
        try:
            xml = connection.lookupByUUIDString(node["domainUuid"]).XMLDesc(0)
        finally:
            connection.close()
        assert f"<source protocol='rbd' name='{ceph_pool.name}/volume-{uid}'" in xml, xml
        Console(node["consoleLog"]).wait(line(f"{guestimage.BOOT_COUNT_PREFIX}2"))

        # -- An RBD snapshot of the running guest's disk (crash-consistent), backed up, then deleted -------
        started = time.monotonic()
        objects.create("snapshots", "Snapshot", "onrbd", {"volume": {"name": "vm-root"}, "keepOnPrimary": True})
        snap = wait_backed_up(objects, "onrbd")
        figures["rbd_snapshot_running_to_backed_up_s"] = time.monotonic() - started
        snap_uid = snap["metadata"]["uid"]
        assert snap["status"]["primary"]["path"] == f"volume-{uid}@snapshot-{snap_uid}"
        snaps = json.loads(ceph_pool.cluster.run("rbd", "snap", "ls", f"{ceph_pool.name}/volume-{uid}",
                                                 "--format", "json"))
        assert [s["name"] for s in snaps] == [f"snapshot-{snap_uid}"]
        backup = snap["status"]["secondary"]["path"]
        assert Path(backup).is_file() and str(zone.store_path) in backup
        assert holds("qcow2", backup, 0xC1, offset)
        objects.delete("snapshots", "onrbd")
        wait_for(lambda: objects.get("snapshots", "onrbd") is None, timeout=60, what="the snapshot deleted")
        assert ceph_pool.cluster.run("rbd", "snap", "ls", f"{ceph_pool.name}/volume-{uid}").strip() == ""
        assert not Path(backup).exists()

        # -- RBD -> local -----------------------------------------------------------------------------------
        objects.patch("virtualmachines", "vm", {"spec": {"state": "Stopped"}})
        wait_phase(zone, "vm", "Stopped", timeout=90)
        started = time.monotonic()
        objects.patch("volumes", "vm-root", {"spec": {"storagePool": zone.pool}})
        # (The Migrated condition of the first move stays True: wait for this move's.)
        wait_for(lambda: f"to {zone.pool}" in condition(objects.get("volumes", "vm-root"), "Migrated").get("message", "")
                 and condition(objects.get("volumes", "vm-root"), "Migrated").get("status") == "True", timeout=240,
                 what="moved back to the local pool")
        figures["migrate_rbd_to_local_s"] = time.monotonic() - started
        status = wait_for(lambda: (s := objects.status("volumes", "vm-root")).get("phase") == "Ready" and s,
                          timeout=30, what="volume Ready")
        assert status["storagePool"] == zone.pool and Path(status["path"]).parent == zone.pool_path
        assert status.get("rbd") is None and status["format"] == "qcow2"
        assert rbd_images(ceph_pool) == []
        assert not list(zone.pool_path.glob("*.verifying*"))
        assert holds("qcow2", status["path"], 0xC1, offset)
        objects.patch("virtualmachines", "vm", {"spec": {"state": "Running"}})
        node = wait_phase(zone, "vm", "Running", timeout=120)["node"]
        Console(node["consoleLog"]).wait(line(f"{guestimage.BOOT_COUNT_PREFIX}3"))

        objects.delete("virtualmachines", "vm")
        wait_for(lambda: not objects.get("virtualmachines", "vm"), timeout=120, what="guest gone")
        cloud.delete("storagepools", rbd_pool)
    finally:
        asyncio.run(reader.close())
    for name, value in figures.items():
        record_property(name, round(value, 2))
        print(f"{name}: {value:.2f}")
