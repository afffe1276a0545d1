"""Storage checks on real directories (hostagent.drivers.storage)."""

from __future__ import annotations

import asyncio
import os
import threading

from hostagent.drivers.storage import StorageDriver
from hostagent.drivers.storage import filesystem
from hostagent.drivers.storage.filesystem import FilesystemStorageDriver, check_directory
from hostagent.drivers.storage.simulator import SimulatorStorageDriver
from hostagent.faults import Fault, FaultInjector


def test_existing_directory_is_reachable_with_capacity(tmp_path):
    report = check_directory(str(tmp_path), create=False)
    stats = os.statvfs(tmp_path)
    assert report.reachable and report.message == ""
    assert report.capacity_bytes == stats.f_blocks * stats.f_frsize > 0
    assert 0 <= report.used_bytes <= report.capacity_bytes
    assert list(tmp_path.iterdir()) == []  # the probe file is gone


def test_missing_directory_is_unreachable_unless_created(tmp_path):
    path = tmp_path / "pool" / "deep"
    report = check_directory(str(path), create=False)
    assert not report.reachable
    assert report.message == f"directory {path} does not exist"
    assert report.capacity_bytes is None
    assert not path.exists()

    report = check_directory(str(path), create=True)
    assert report.reachable and path.is_dir()


def test_a_file_is_not_a_directory(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    report = check_directory(str(path), create=True)
    assert not report.reachable and report.message == f"{path} is not a directory"


def test_unwritable_directory_is_unreachable():
    # /proc refuses new files even to root, unlike a chmod-ed directory.
    report = check_directory("/proc", create=False)
    assert not report.reachable
    assert report.message.startswith("directory /proc cannot be written: ")


def test_read_only_store_needs_only_read_access():
    report = check_directory("/proc", create=False, writable=False)
    assert report.reachable and report.capacity_bytes is not None


def test_creation_failure_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    report = check_directory(str(blocker / "pool"), create=True)
    assert not report.reachable and report.message.startswith(f"cannot create directory {blocker / 'pool'}: ")


def test_driver_reports_a_hung_check_without_piling_up_threads(tmp_path, monkeypatch):
    release, calls = threading.Event(), []

    def hanging(path, *, create, writable=True):
        calls.append(path)
        release.wait(10)
        return check_directory(path, create=create, writable=writable)

    monkeypatch.setattr(filesystem, "check_directory", hanging)

    async def scenario():
        driver = FilesystemStorageDriver(timeout=0.2)
        assert isinstance(driver, StorageDriver)
        first = await driver.check(str(tmp_path), create=False)
        second = await driver.check(str(tmp_path), create=False)
        release.set()
        await asyncio.sleep(0.1)
        third = await driver.check(str(tmp_path), create=False)
        await driver.close()
        return first, second, third

    first, second, third = asyncio.run(scenario())
    assert not first.reachable and first.message == f"checking {tmp_path} did not finish within 0.2s"
    assert not second.reachable and second.message.startswith(f"checking {tmp_path} has hung since 20")
    assert third.reachable
    assert len(calls) == 2  # the second check did not start another thread on the hung path


def test_simulator_storage_reports_configured_capacity_and_storage_faults():
    faults = FaultInjector()
    driver = SimulatorStorageDriver(faults, capacity_bytes=2**40)

    async def check():
        return await driver.check("/anywhere", create=False)

    healthy = asyncio.run(check())
    assert healthy.reachable and healthy.capacity_bytes == 2**40 and healthy.used_bytes == 0
    faults.configure({"storage": Fault(fail=True, message="NFS server not responding", times=1)})
    failed = asyncio.run(check())
    assert not failed.reachable and failed.message == "NFS server not responding"
    assert asyncio.run(check()).reachable
