"""The simulator storage driver: every directory is reachable with the configured capacity, disks and
template copies exist in memory only. Fault injection per operation: ``storage`` (directory checks),
``create-volume``, ``resize`` (offline; a live resize is the hypervisor's ``resize``), ``download``, ``snapshot``."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import typing as t

from controllers.api.v1alpha1.host import StorageReport

from ...faults import FaultInjector, InjectedFailure
from ...images import DownloadError, DownloadRequest, DownloadResult, Progress
from . import BaseImageRef, DiskState, StorageError

SIMULATED_IMAGE_BYTES = 1024**3
"""Virtual size of every simulated template image (and of a root disk created without a size)."""


class SimulatorStorageDriver:
    def __init__(self, faults: FaultInjector, *, capacity_bytes: int, call_timeout: float = 30.0,
                 disk_sizes: dict[str, int] | None = None, saved: t.Callable[[], None] | None = None) -> None:
        self.faults = faults
        self.capacity_bytes = capacity_bytes
        self.call_timeout = call_timeout
        # path -> virtual size; shared with the host's simulator hypervisor (live resizes)
        self.disk_sizes = disk_sizes if disk_sizes is not None else {}
        # Called after each change of disk_sizes: the hypervisor driver's save (--sim-persist).
        self.saved = saved or (lambda: None)
        self.templates: set[str] = set()

    async def _operation(self, operation: str, error: type[Exception] = StorageError) -> None:
        try:
            await self.faults.inject(operation, deadline=self.call_timeout)
        except InjectedFailure as failure:
            raise error(str(failure)) from None

    async def check(self, path: str, *, create: bool, writable: bool = True) -> StorageReport:
        try:
            await self.faults.inject("storage", deadline=self.call_timeout)
        except InjectedFailure as error:
            return StorageReport(reachable=False, message=str(error))
        return StorageReport(reachable=True, capacity_bytes=self.capacity_bytes, used_bytes=0)

    async def disk_info(self, path: str) -> DiskState | None:
        size = self.disk_sizes.get(path)
        return None if size is None else DiskState(virtual_size=size, physical_size=0, format="qcow2")

    async def create_disk(self, path: str, size_bytes: int, base: BaseImageRef | None = None) -> None:
        await self._operation("create-volume")
        self.disk_sizes.setdefault(path, size_bytes)
        self.saved()

    async def resize_disk(self, path: str, size_bytes: int) -> None:
        if path not in self.disk_sizes:
            raise StorageError(f"disk {path} does not exist")
        await self._operation("resize")
        self.disk_sizes[path] = max(self.disk_sizes[path], size_bytes)
        self.saved()

    async def delete_disk(self, path: str) -> None:
        if self.disk_sizes.pop(path, None) is not None:
            self.saved()

    async def snapshot_disk(self, path: str, target: str) -> None:
        if path not in self.disk_sizes:
            raise StorageError(f"disk {path} does not exist")
        await self._operation("snapshot")
        self.disk_sizes[target] = self.disk_sizes[path]

    async def snapshot_exists(self, target: str) -> bool:
        return target in self.disk_sizes

    async def backup_snapshot(self, primary: str, target: str) -> int:
        if primary not in self.disk_sizes:
            raise StorageError(f"snapshot {primary} does not exist")
        await self._operation("snapshot")
        self.disk_sizes[target] = self.disk_sizes[primary]
        return 0

    async def delete_snapshot(self, location: str) -> None:
        self.disk_sizes.pop(location, None)

    async def restore_disk(self, source: str, path: str) -> None:
        if source not in self.disk_sizes:
            raise StorageError(f"{source} does not exist")
        self.disk_sizes[path] = self.disk_sizes[source]

    async def copy_disk(self, source: str, target: str) -> None:
        await self.restore_disk(source, target)

    async def download_template(self, request: DownloadRequest, progress: Progress,
                                cancel: threading.Event) -> DownloadResult:
        progress.total, progress.bytes = SIMULATED_IMAGE_BYTES, 0
        await self._operation("download", DownloadError)
        await asyncio.sleep(0)
        progress.bytes = SIMULATED_IMAGE_BYTES
        self.templates.add(request.path)
        checksum = request.checksum or f"sha256:{hashlib.sha256(request.url.encode()).hexdigest()}"
        return DownloadResult(detected_format=request.declared_format or "QCOW2", checksum=checksum,
                              physical_size_bytes=SIMULATED_IMAGE_BYTES, virtual_size_bytes=SIMULATED_IMAGE_BYTES)

    async def delete_template(self, path: str) -> None:
        self.templates.discard(path)

    async def close(self) -> None:
        return None
