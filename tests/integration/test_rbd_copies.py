"""RBD whole-disk copies against a real Ceph (conftest_ceph): snapshots as RBD snapshots backed up to an image
store as qcow2, reverts (rollback from the kept snapshot, or the backup written into the image), a volume from a
backup, and copies between a directory pool and an RBD pool verified with ``qemu-img compare``.

Content is checked with ``qemu-io`` through QEMU's rbd driver (the driver's private conf + keyring): a 64 KiB
pattern, marker A then B, at an offset."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

import pytest

pytest.register_assert_rewrite("conftest_ceph", "diskmarks")
from conftest_ceph import CephPool  # noqa: E402
from diskmarks import MIB, holds, write  # noqa: E402

from hostagent.drivers.storage import DiskCopies  # noqa: E402
from hostagent.drivers.storage.filesystem import FilesystemStorageDriver  # noqa: E402
from hostagent.drivers.storage.rbd import RbdAccess  # noqa: E402
from hostagent.drivers.storage.rbdcopies import RbdCopiesDriver, copy_across  # noqa: E402

pytest_plugins = ["conftest_ceph"]
pytestmark = pytest.mark.timeout(300)
A, B = 0xA1, 0xB2


def rbd_snaps(pool: CephPool, image: str) -> list[str]:
    import json

    return [s["name"] for s in json.loads(pool.cluster.run("rbd", "snap", "ls", f"{pool.name}/{image}",
                                                           "--format", "json"))]


def rbd_images(pool: CephPool) -> list[str]:
    return sorted(pool.cluster.run("rbd", "ls", "-p", pool.name).split())


def test_rbd_snapshot_backup_revert_and_volume_from_snapshot(ceph_pool: CephPool, tmp_path, record_property) -> None:
    store = tmp_path / "store"

    async def scenario() -> dict[str, float]:
        figures: dict[str, float] = {}
        driver = RbdCopiesDriver(RbdAccess(monitors=(ceph_pool.monitor,), pool=ceph_pool.name, user=ceph_pool.user,
                                           key=ceph_pool.key), host="h1")
        assert isinstance(driver, DiskCopies)
        try:
            await driver.create_disk("vol", 64 * MIB)
            vol = driver.qemu_location("vol")
            # The key never appears in the QEMU filename (it stays in the 0600 keyring).
            assert ceph_pool.key not in vol
            keyring = os.path.join(os.path.dirname(vol.rsplit(":conf=", 1)[1]), "keyring")
            assert os.stat(keyring).st_mode & 0o777 == 0o600
            write("raw", vol, A)

            primary, backup = "vol@snapshot-1", str(store / "snapshots" / "s1.qcow2")
            assert not await driver.snapshot_exists(primary)
            started = time.monotonic()
            await driver.snapshot_disk("vol", primary)
            await driver.snapshot_disk("vol", primary)  # redone after a crash: nothing more
            figures["rbd_snapshot_s"] = time.monotonic() - started
            assert await driver.snapshot_exists(primary)
            assert rbd_snaps(ceph_pool, "vol") == ["snapshot-1"]
            started = time.monotonic()
            size = await driver.backup_snapshot(primary, backup)
            figures["rbd_backup_64mib_s"] = time.monotonic() - started
            assert size == os.stat(backup).st_size and not os.path.exists(backup + ".copying")
            assert holds("qcow2", backup, A)
            write("raw", vol, B)
            assert holds("raw", vol, B)

            # Revert from the kept primary: rbd snap rollback.
            await driver.restore_disk(primary, "vol")
            assert holds("raw", vol, A)

            # The disk grew and got B again; revert from the backup alone (primary removed): A, cut to the
            # snapshot's size (the agent grows it back with zeroes).
            await driver.resize_disk("vol", 96 * MIB)
            write("raw", vol, B)
            write("raw", vol, B, 80 * MIB)
            await driver.delete_snapshot(primary)
            await driver.delete_snapshot(primary)  # already gone: fine
            assert rbd_snaps(ceph_pool, "vol") == []
            await driver.restore_disk(backup, "vol")
            assert holds("raw", vol, A)
            assert (await driver.disk_info("vol")).virtual_size == 64 * MIB

            # A new volume from the backup.
            await driver.restore_disk(backup, "fromsnap")
            assert holds("raw", driver.qemu_location("fromsnap"), A)
            assert "fromsnap.restoring" not in rbd_images(ceph_pool)

            # A kept snapshot does not block deleting its volume (the backup stays); delete removes the backup.
            await driver.snapshot_disk("vol", "vol@snapshot-2")
            await driver.delete_disk("vol")
            await driver.delete_disk("fromsnap")
            assert rbd_images(ceph_pool) == []
            assert os.path.exists(backup)
            await driver.delete_snapshot(backup)
            assert not os.path.exists(backup)
        finally:
            await driver.close()
        return figures

    for name, value in asyncio.run(scenario()).items():
        record_property(name, round(value, 2))
        print(f"{name}: {value:.2f}")


def test_copies_between_a_directory_pool_and_rbd(ceph_pool: CephPool, tmp_path, record_property) -> None:
    local = tmp_path / "pool" / "disk.qcow2"
    local.parent.mkdir()
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(local), str(48 * MIB)], check=True, capture_output=True)
    write("qcow2", str(local), A)
    write("qcow2", str(local), B, 40 * MIB)

    async def scenario() -> dict[str, float]:
        figures: dict[str, float] = {}
        rbd = RbdCopiesDriver(RbdAccess(monitors=(ceph_pool.monitor,), pool=ceph_pool.name, user=ceph_pool.user,
                                        key=ceph_pool.key), host="h1")
        files = FilesystemStorageDriver()
        try:
            started = time.monotonic()
            await copy_across(files, str(local), rbd, "moved")
            figures["copy_local_to_rbd_48mib_s"] = time.monotonic() - started
            assert rbd_images(ceph_pool) == ["moved"]
            image = rbd.qemu_location("moved")
            assert holds("raw", image, A) and holds("raw", image, B, 40 * MIB)
            assert (await rbd.disk_info("moved")).virtual_size == 48 * MIB

            back = tmp_path / "pool2" / "back.qcow2"
            started = time.monotonic()
            await copy_across(rbd, "moved", files, str(back))
            figures["copy_rbd_to_local_48mib_s"] = time.monotonic() - started
            assert holds("qcow2", str(back), A) and holds("qcow2", str(back), B, 40 * MIB)
            assert sorted(p.name for p in back.parent.iterdir()) == ["back.qcow2"]

            # A source that is not there: the copy fails with the reason and leaves nothing on the target.
            with pytest.raises(Exception) as failed:
                await copy_across(rbd, "missing", files, str(tmp_path / "pool2" / "x.qcow2"))
            assert "qemu-img" in str(failed.value)
            assert sorted(p.name for p in back.parent.iterdir()) == ["back.qcow2"]
            with pytest.raises(Exception):
                await copy_across(files, str(tmp_path / "nope.qcow2"), rbd, "x")
            assert rbd_images(ceph_pool) == ["moved"]
            await rbd.delete_disk("moved")
        finally:
            await rbd.close()
            await files.close()
        return figures

    for name, value in asyncio.run(scenario()).items():
        record_property(name, round(value, 2))
        print(f"{name}: {value:.2f}")
