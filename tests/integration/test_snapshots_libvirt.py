"""Snapshots, reverts, volumes and templates from snapshots, and storage migration, end to end on real libvirt:
the session controller, a real agent driving a private libvirtd (QEMU/TCG) and the tiny test guest.

Disk content is checked below the guest with ``qemu-io`` (qemu-utils): a 64 KiB pattern written at an offset
the guest's file system does not use (the end of the disk), read back with pattern verification. The tiny
guest's boot counter (on its root disk) tells which disk a guest booted from: a guest booted from a copy of a
disk that booted once prints ``boot-count=2``.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("conftest_libvirt")
from conftest_libvirt import unique, wait_for  # noqa: E402
from libvirtcloud import (  # noqa: E402
    Console,
    build_zone,
    libvirt_domain,
    line,
    template_spec,
    wait_backed_up,
    wait_condition,
    wait_phase,
)

from cumulo import guestimage  # noqa: E402

pytest_plugins = ["conftest_libvirt"]
pytestmark = [pytest.mark.usefixtures("controller", "system_namespace"), pytest.mark.timeout(600)]

MARK_LENGTH = 64 * 1024


def qemu_io(path: str, command: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("qemu-io") is None:
        pytest.skip(reason="qemu-io is not installed (Debian package qemu-utils)")
    return subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, path], capture_output=True, text=True,
                          timeout=120)


def write_mark(path: str, offset: int, pattern: int, length: int = MARK_LENGTH) -> None:
    result = qemu_io(path, f"write -P {pattern:#x} {offset} {length}")
    assert result.returncode == 0 and "wrote" in result.stdout, result.stdout + result.stderr


def has_mark(path: str, offset: int, pattern: int, length: int = MARK_LENGTH) -> bool:
    result = qemu_io(path, f"read -P {pattern:#x} {offset} {length}")
    output = result.stdout + result.stderr
    if "Pattern verification failed" in output:
        return False
    assert result.returncode == 0 and "read" in result.stdout, output
    return True


def image_info(path: str) -> dict[str, Any]:
    import json

    result = subprocess.run(["qemu-img", "info", "-U", "--output=json", path], capture_output=True, text=True,
                            check=True, timeout=60)
    return json.loads(result.stdout)


def made_from(guest, zone: str, **source: Any) -> dict[str, Any]:
    """A template spec made from a snapshot or volume, booting with the tiny guest's kernel and initrd."""
    spec = {key: value for key, value in template_spec(guest, zone).items() if key not in ("url", "checksum")}
    return spec | source


def test_snapshot_revert_volume_and_template_from_snapshot(cloud, kube, control_plane, agents, libvirtd, guest,
                                                           tmp_path, record_property) -> None:
    zone, _agent = build_zone(cloud, kube, control_plane, agents, libvirtd, tmp_path)
    objects = zone.objects
    figures: dict[str, float] = {}
    objects.create("templates", "Template", "tiny", template_spec(guest, zone.name))
    wait_for(lambda: (objects.get("templates", "tiny") or {}).get("status", {}).get("state") == "Ready", timeout=60,
             what="template Ready")
    objects.create("virtualmachines", "VirtualMachine", "vm1", {
        "serviceOffering": zone.offering, "template": {"name": "tiny"}, "zone": zone.name})
    node = wait_phase(zone, "vm1", "Running", timeout=120)["node"]
    uid1 = objects.get("virtualmachines", "vm1")["metadata"]["uid"]
    console = Console(node["consoleLog"])
    console.wait(line(f"{guestimage.BOOT_COUNT_PREFIX}1"))
    root = objects.get("volumes", "vm1-root")["status"]["path"]
    size = image_info(root)["virtual-size"]
    offset = size - 1024 * 1024  # past the data of the guest's file system

    # -- A snapshot of the running guest's disk: the guest keeps running (same domain run) ------------------
    run_before = libvirt_domain(libvirtd.uri, uid1)
    started = time.monotonic()
    objects.create("snapshots", "Snapshot", "live", {"volume": {"name": "vm1-root"}, "keepOnPrimary": True})
    live = wait_backed_up(objects, "live")
    figures["live_snapshot_to_backed_up_s"] = time.monotonic() - started
    assert live["status"]["node"]["live"] is True
    assert libvirt_domain(libvirtd.uri, uid1) is not None and libvirt_domain(libvirtd.uri, uid1)[0] == run_before[0]
    assert objects.status("virtualmachines", "vm1")["phase"] == "Running"
    live_primary = Path(live["status"]["primary"]["path"])
    live_backup = Path(live["status"]["secondary"]["path"])
    assert live_primary.is_file() and zone.pool_path in live_primary.parents  # kept on primary
    assert live_backup.is_file() and zone.store_path in live_backup.parents
    assert "backing-filename" not in image_info(str(live_backup))  # standalone
    assert live["status"]["physicalSizeBytes"] == live_backup.stat().st_size
    assert live["status"]["sizeBytes"] == size
    assert "cumulo.io/host" in objects.get("snapshots", "live")["metadata"]["labels"]

    # -- Stopped guest: marker A, snapshot, marker B, revert: A is back, B gone -----------------------------
    objects.patch("virtualmachines", "vm1", {"spec": {"state": "Stopped"}})
    wait_phase(zone, "vm1", "Stopped", timeout=90)
    write_mark(root, offset, 0xAA)
    started = time.monotonic()
    objects.create("snapshots", "Snapshot", "snap-a", {"volume": {"name": "vm1-root"}})
    snap_a = wait_backed_up(objects, "snap-a")
    figures["stopped_snapshot_to_backed_up_s"] = time.monotonic() - started
    assert snap_a["status"]["node"]["live"] is False
    backup_a = Path(snap_a["status"]["secondary"]["path"])
    assert has_mark(str(backup_a), offset, 0xAA)
    # keepOnPrimary false: the primary copy goes once backed up.
    wait_for(lambda: objects.get("snapshots", "snap-a")["status"].get("primary") is None, timeout=30,
             what="the primary copy removed")
    assert not list((zone.pool_path / "snapshots").glob(f"{snap_a['metadata']['uid']}*"))
    store = next(s for s in cloud.list("imagestores") if s["spec"]["zone"] == zone.name)["metadata"]["name"]
    wait_for(lambda: cloud.get("imagestores", store).get("status", {}).get("snapshots") == 2, timeout=30,
             what="the ImageStore counting 2 snapshots")

    write_mark(root, offset, 0xBB)
    assert has_mark(root, offset, 0xBB)
    started = time.monotonic()
    objects.patch("volumes", "vm1-root", {"spec": {"revert": {"snapshot": "snap-a"}}})
    wait_condition(objects, "volumes", "vm1-root", "Reverted", "True", "Reverted")
    figures["revert_s"] = time.monotonic() - started
    wait_for(lambda: objects.status("volumes", "vm1-root").get("phase") == "Ready", timeout=30, what="volume Ready")
    assert has_mark(root, offset, 0xAA) and not has_mark(root, offset, 0xBB)

    # -- A new volume from the snapshot has A --------------------------------------------------------------
    objects.create("volumes", "Volume", "restored", {"zone": zone.name, "storagePool": zone.pool,
                                                     "fromSnapshot": {"name": "snap-a"}})
    restored = wait_for(lambda: (v := objects.get("volumes", "restored")).get("status", {}).get("phase") == "Ready" and v,
                        timeout=60, what="volume from snapshot Ready")
    assert restored["status"]["sizeBytes"] == size and restored["status"]["sourceImage"] == str(backup_a)
    assert has_mark(restored["status"]["path"], offset, 0xAA)

    # -- A template from the snapshot boots a new guest, from that disk (its boot counter goes on) --------------
    started = time.monotonic()
    objects.create("templates", "Template", "from-snap", made_from(guest, zone.name, fromSnapshot={"name": "snap-a"}))
    template = wait_for(lambda: (t_ := objects.get("templates", "from-snap")).get("status", {}).get("state") == "Ready"
                        and t_, timeout=90, what="template from snapshot Ready")
    figures["template_from_snapshot_s"] = time.monotonic() - started
    copy = Path(template["status"]["zones"][0]["path"])
    assert copy.is_file() and has_mark(str(copy), offset, 0xAA)
    objects.create("virtualmachines", "VirtualMachine", "vm2", {
        "serviceOffering": zone.offering, "template": {"name": "from-snap"}, "zone": zone.name})
    node2 = wait_phase(zone, "vm2", "Running", timeout=120)["node"]
    Console(node2["consoleLog"]).wait(line(f"{guestimage.BOOT_COUNT_PREFIX}2"))

    # -- Reverting under a running guest is refused with a reason --------------------------------------------
    objects.patch("virtualmachines", "vm1", {"spec": {"state": "Running"}})
    wait_phase(zone, "vm1", "Running", timeout=120)
    objects.patch("volumes", "vm1-root", {"spec": {"revert": {"snapshot": "snap-a", "token": "again"}}})
    refused = wait_condition(objects, "volumes", "vm1-root", "Reverted", "False", "VirtualMachineNotStopped")
    assert "stop VirtualMachine vm1" in refused["message"]
    assert objects.status("volumes", "vm1-root")["phase"] == "Attached"

    # -- A template from a stopped guest's root volume -------------------------------------------------------
    objects.patch("virtualmachines", "vm2", {"spec": {"state": "Stopped"}})
    wait_phase(zone, "vm2", "Stopped", timeout=90)
    objects.create("templates", "Template", "from-vol", made_from(guest, zone.name, fromVolume={"name": "vm2-root"}))
    from_vol = wait_for(lambda: (t_ := objects.get("templates", "from-vol")).get("status", {}).get("state") == "Ready"
                        and t_, timeout=90, what="template from volume Ready")
    vol_copy = from_vol["status"]["zones"][0]["path"]
    assert "backing-filename" not in image_info(vol_copy)
    vm2_root = objects.get("volumes", "vm2-root")["status"]["path"]
    assert subprocess.run(["qemu-img", "compare", "-U", vol_copy, vm2_root], timeout=120).returncode == 0

    # -- Deleting a snapshot removes both copies -------------------------------------------------------------
    objects.delete("snapshots", "live")
    wait_for(lambda: objects.get("snapshots", "live") is None, timeout=60, what="Snapshot live gone")
    assert not live_primary.exists() and not live_backup.exists()
    wait_for(lambda: cloud.get("imagestores", store).get("status", {}).get("snapshots") == 1, timeout=30,
             what="the ImageStore counting 1 snapshot")
    # One whose primary copy went after the backup: its backup goes (the volume made from it keeps its disk).
    objects.delete("snapshots", "snap-a")
    wait_for(lambda: objects.get("snapshots", "snap-a") is None, timeout=60, what="Snapshot snap-a gone")
    assert not backup_a.exists() and Path(restored["status"]["path"]).is_file()
    wait_for(lambda: cloud.get("imagestores", store).get("status", {}).get("snapshots") == 0, timeout=30,
             what="the ImageStore counting no snapshot")

    for name, value in figures.items():
        record_property(name, round(value, 2))
        print(f"{name}: {value:.2f}")
    for vm in ("vm1", "vm2"):
        objects.delete("virtualmachines", vm)
    wait_for(lambda: not objects.get("virtualmachines", "vm1") and not objects.get("virtualmachines", "vm2"),
             timeout=120, what="guests gone")


def test_storage_migration_survives_a_killed_agent(cloud, kube, control_plane, agents, libvirtd, guest, tmp_path,
                                                    record_property) -> None:
    zone, agent = build_zone(cloud, kube, control_plane, agents, libvirtd, tmp_path)
    objects = zone.objects
    second, second_path = unique("local2"), tmp_path / "pool2"
    cloud.create("storagepools", second, {"zone": zone.name, "scope": "Host", "type": "Filesystem",
                                          "host": zone.host, "path": str(second_path)})
    wait_for(lambda: (cloud.get("storagepools", second).get("status") or {}).get("state") == "Up", timeout=30,
             what="the second pool Up")
    objects.create("templates", "Template", "tiny", template_spec(guest, zone.name))
    wait_for(lambda: (objects.get("templates", "tiny") or {}).get("status", {}).get("state") == "Ready", timeout=60,
             what="template Ready")
    objects.create("virtualmachines", "VirtualMachine", "vm", {
        "serviceOffering": zone.offering, "template": {"name": "tiny"}, "zone": zone.name})
    node = wait_phase(zone, "vm", "Running", timeout=120)["node"]
    Console(node["consoleLog"]).wait(line(f"{guestimage.BOOT_COUNT_PREFIX}1"))
    objects.patch("virtualmachines", "vm", {"spec": {"state": "Stopped"}})
    wait_phase(zone, "vm", "Stopped", timeout=90)

    volume = objects.get("volumes", "vm-root")
    source_pool = volume["status"]["storagePool"]
    target_pool, target_dir = (second, second_path) if source_pool == zone.pool else (zone.pool, zone.pool_path)
    # Grow the disk and fill the new space, so the copy takes long enough to be cut short.
    objects.patch("volumes", "vm-root", {"spec": {"sizeGiB": 2}})
    wait_for(lambda: (objects.status("volumes", "vm-root").get("node") or {}).get("sizeBytes") == 2 * 1024**3,
             timeout=60, what="the disk grown")
    source = volume["status"]["path"]
    write_mark(source, 1024**3, 0xCD, 1024**3)

    # Storage migration of a Stopped guest's running disk is refused while the guest runs... (checked in the
    # other direction below); here: move it, and kill the agent in the middle of the copy.
    started = time.monotonic()
    objects.patch("volumes", "vm-root", {"spec": {"storagePool": target_pool}})
    wait_for(lambda: objects.status("volumes", "vm-root").get("phase") == "Migrating", timeout=30,
             what="volume Migrating")
    wait_for(lambda: list(target_dir.glob("*.copying")), timeout=60, interval=0.05, what="the copy under way")
    agent.kill()
    status = objects.status("volumes", "vm-root")
    assert status["path"] == source and status["storagePool"] == source_pool and Path(source).is_file()
    assert status["phase"] == "Migrating"
    assert has_mark(source, 1024**3, 0xCD, 1024**3)
    agent.start()
    wait_condition(objects, "volumes", "vm-root", "Migrated", "True", timeout=240)
    figures = {"migration_2gib_with_agent_kill_s": time.monotonic() - started}
    status = wait_for(lambda: (s := objects.status("volumes", "vm-root")).get("phase") == "Ready" and s, timeout=30,
                      what="volume Ready")
    assert status["storagePool"] == target_pool and Path(status["path"]).parent == target_dir
    assert status.get("migration") is None and not Path(source).exists()
    assert not list(target_dir.glob("*.copying")) and not list(target_dir.glob("*.verifying"))
    assert has_mark(status["path"], 1024**3, 0xCD, 1024**3)
    # The guest boots from the moved disk (its boot counter goes on).
    objects.patch("virtualmachines", "vm", {"spec": {"state": "Running"}})
    node = wait_phase(zone, "vm", "Running", timeout=120)["node"]
    Console(node["consoleLog"]).wait(line(f"{guestimage.BOOT_COUNT_PREFIX}2"))
    # Moving a running guest's disk is refused with a reason.
    objects.patch("volumes", "vm-root", {"spec": {"storagePool": source_pool}})
    refused = wait_condition(objects, "volumes", "vm-root", "Migrated", "False", "VirtualMachineNotStopped")
    assert "stop VirtualMachine vm" in refused["message"]
    for name, value in figures.items():
        record_property(name, round(value, 2))
        print(f"{name}: {value:.2f}")
    objects.delete("virtualmachines", "vm")
    wait_for(lambda: not objects.get("virtualmachines", "vm"), timeout=120, what="guest gone")
