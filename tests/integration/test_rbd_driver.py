"""The RBD storage driver against a real Ceph: pool checks with Ceph's own capacity, a template imported once
as a protected snapshot, root volumes as copy-on-write clones, plain data volumes, resize, delete, and the
template image removed with its last clone."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

pytest.register_assert_rewrite("conftest_ceph")
from conftest_ceph import CephPool  # noqa: E402

from hostagent.drivers.storage import BaseImageRef, StorageDriver  # noqa: E402
from hostagent.drivers.storage.rbd import RbdAccess, RbdStorageDriver  # noqa: E402

pytest_plugins = ["conftest_ceph"]
MIB = 1024**2


def access(pool: CephPool, key: str | None = None) -> RbdAccess:
    return RbdAccess(monitors=(pool.monitor,), pool=pool.name, user=pool.user, key=key or pool.key)


def test_rbd_driver_templates_clones_volumes(ceph_pool: CephPool, tmp_path, record_property) -> None:
    template = tmp_path / "template.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(template), str(64 * MIB)], check=True,
                   capture_output=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", str(template)], check=True,
                   capture_output=True)

    async def scenario() -> None:
        driver = RbdStorageDriver(access(ceph_pool), host="h1")
        assert isinstance(driver, StorageDriver)
        try:
            report = await driver.check(ceph_pool.name, create=False)
            assert report.reachable, report.message
            assert report.capacity_bytes and report.capacity_bytes > 1024**3  # the memstore's size, from Ceph
            assert 0 <= (report.used_bytes or 0) <= report.capacity_bytes

            base = BaseImageRef(source=str(template), path="template-t1@base", format="qcow2")
            started = time.monotonic()
            await driver.create_disk("volume-root1", 128 * MIB, base)  # imports the template, then clones
            first = time.monotonic() - started
            started = time.monotonic()
            await driver.create_disk("volume-root2", 32 * MIB, base)  # smaller than the template: its size
            clone = time.monotonic() - started
            record_property("rbd_import_and_clone_seconds", round(first, 2))
            record_property("rbd_clone_seconds", round(clone, 2))
            print(f"first root volume (import + clone) {first:.2f}s, next clone {clone:.2f}s")
            assert (await driver.disk_info("volume-root1")).virtual_size == 128 * MIB
            assert (await driver.disk_info("volume-root2")).virtual_size == 64 * MIB
            assert await driver.clones("template-t1@base") == ["volume-root1", "volume-root2"]
            await driver.create_disk("volume-root2", 32 * MIB, base)  # again: nothing to do

            # The clone reads the template's bytes (through QEMU's rbd driver).
            out = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 1M", driver.qemu_uri("volume-root1")],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0 and "read 1048576/1048576" in out.stdout, out.stdout + out.stderr

            await driver.create_disk("volume-data", 16 * MIB)
            assert (await driver.disk_info("volume-data")).virtual_size == 16 * MIB
            await driver.resize_disk("volume-data", 48 * MIB)
            assert (await driver.disk_info("volume-data")).virtual_size == 48 * MIB
            assert await driver.disk_info("volume-missing") is None

            await driver.delete_disk("volume-root1")
            assert "template-t1" in await driver.images()  # a clone still needs it
            await driver.delete_disk("volume-root2")
            await driver.delete_disk("volume-data")
            await driver.delete_disk("volume-data")  # a missing one is fine
            assert await driver.images() == []  # the last clone took the template image and its snapshot along

            # A crashed import's leftover (snapshot made and protected, not renamed) is cleared by the next import.
            def leftover_and_foreign_clone() -> None:
                import rbd

                with driver.ioctx() as ioctx:
                    rbd.RBD().create(ioctx, "template-t2.importing-h1", MIB)
                    with rbd.Image(ioctx, "template-t2.importing-h1") as image:
                        image.create_snap("base")
                        image.protect_snap("base")
                    rbd.RBD().create(ioctx, "volume-src", MIB)  # a clone of a volume's snapshot
                    with rbd.Image(ioctx, "volume-src") as image:
                        image.create_snap("s1")
                        image.protect_snap("s1")
                    rbd.RBD().clone(ioctx, "volume-src", "s1", ioctx, "volume-child",
                                    features=rbd.RBD_FEATURE_LAYERING)

            await asyncio.to_thread(leftover_and_foreign_clone)
            await driver.create_disk("volume-root3", MIB, BaseImageRef(source=str(template), path="template-t2@base",
                                                                       format="qcow2"))
            assert "template-t2.importing-h1" not in await driver.images()
            await driver.delete_disk("volume-root3")
            await driver.delete_disk("volume-child")
            assert await driver.images() == ["volume-src"]  # only template images go with their last clone
        finally:
            await driver.close()

        other_key = subprocess.run(["ceph-authtool", "--gen-print-key"], capture_output=True, text=True,
                                   check=True).stdout.strip()
        wrong = RbdStorageDriver(access(ceph_pool, key=other_key), host="h1")
        try:
            report = await wrong.check(ceph_pool.name, create=False)
            assert not report.reachable
            assert "cannot connect to" in report.message and "client." + ceph_pool.user in report.message
            # Ceph's own words: cephx refuses the key, the client gives up (timed out / permission denied).
            assert "error connecting to the cluster" in report.message, report.message
        finally:
            await wrong.close()

        missing = RbdStorageDriver(RbdAccess(monitors=(ceph_pool.monitor,), pool="no-such-pool",
                                             user="admin", key=ceph_pool.cluster.admin_key), host="h1")
        try:
            report = await missing.check("no-such-pool", create=False)
            assert not report.reachable and "the pool does not exist" in report.message
        finally:
            await missing.close()

    asyncio.run(scenario())
