"""Whole-disk copies of the filesystem storage driver (snapshots, backups, reverts, migrations) with real
qemu-img/qemu-io on small images."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import pytest

from hostagent.drivers.storage import DiskCopies, StorageDriver, StorageError
from hostagent.drivers.storage.filesystem import FilesystemStorageDriver
from hostagent.drivers.storage.simulator import SimulatorStorageDriver
from hostagent.faults import FaultInjector

pytestmark = pytest.mark.skipif(shutil.which("qemu-io") is None or shutil.which("qemu-img") is None,
                                reason="qemu-img and qemu-io are not installed (Debian package qemu-utils)")
MIB = 1024 * 1024


def write(path, offset: int, pattern: int) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern:#x} {offset} 64k", str(path)], check=True,
                   capture_output=True)


def holds(path, offset: int, pattern: int) -> bool:
    result = subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"read -P {pattern:#x} {offset} 64k", str(path)],
                            capture_output=True, text=True)
    return result.returncode == 0 and "verification failed" not in result.stdout + result.stderr


def test_both_drivers_are_storage_drivers_with_disk_copies():
    for driver in (FilesystemStorageDriver(), SimulatorStorageDriver(FaultInjector(), capacity_bytes=1)):
        assert isinstance(driver, StorageDriver) and isinstance(driver, DiskCopies)


def test_snapshot_backup_restore_and_verified_copy(tmp_path):
    async def scenario():
        driver = FilesystemStorageDriver()
        base, disk = tmp_path / "base.qcow2", tmp_path / "pool" / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(8 * MIB)], check=True)
        write(base, 0, 0x11)
        await driver.create_disk(str(disk), 8 * MIB, None)
        subprocess.run(["qemu-img", "rebase", "-q", "-u", "-F", "qcow2", "-b", str(base), str(disk)], check=True)
        write(disk, MIB, 0xAA)

        primary = tmp_path / "pool" / "snapshots" / "s.qcow2"
        await driver.snapshot_disk(str(disk), str(primary))
        assert await driver.snapshot_exists(str(primary))
        backup = tmp_path / "store" / "snapshots" / "s.qcow2"
        size = await driver.backup_snapshot(str(primary), str(backup))
        assert size == backup.stat().st_size > 0
        info = subprocess.run(["qemu-img", "info", str(backup)], capture_output=True, text=True, check=True).stdout
        assert "backing file" not in info  # standalone: the template's data is in it
        assert holds(backup, 0, 0x11) and holds(backup, MIB, 0xAA)

        write(disk, MIB, 0xBB)
        await driver.restore_disk(str(backup), str(disk))
        assert holds(disk, MIB, 0xAA) and holds(disk, 0, 0x11)

        target = tmp_path / "pool2" / "disk.qcow2"
        await driver.copy_disk(str(disk), str(target))
        assert holds(target, MIB, 0xAA)
        assert not list((tmp_path / "pool2").glob("*.verifying*")) and not list((tmp_path / "pool").glob("*.copying"))

        await driver.delete_snapshot(str(primary))
        assert not primary.exists()
        with pytest.raises(StorageError, match="does not exist"):
            await driver.restore_disk(str(tmp_path / "missing.qcow2"), str(disk))
        assert holds(disk, MIB, 0xAA)  # a failed restore leaves the disk as it was

    asyncio.run(scenario())


def test_a_copy_that_differs_is_refused_and_removed(tmp_path, monkeypatch):
    async def scenario():
        driver = FilesystemStorageDriver()
        disk = tmp_path / "disk.qcow2"
        await driver.create_disk(str(disk), 4 * MIB, None)

        async def differs(first, second, **_):
            return False

        monkeypatch.setattr(driver.qemu_img, "compare", differs)
        target = tmp_path / "other" / "disk.qcow2"
        with pytest.raises(StorageError, match="differs"):
            await driver.copy_disk(str(disk), str(target))
        assert not target.exists() and not list((tmp_path / "other").iterdir())

    asyncio.run(scenario())
