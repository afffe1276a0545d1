"""The filesystem storage driver: a pool or image store is a directory on the host, a volume a qcow2 file.

Checks run in worker threads with a deadline: a dead NFS server leaves ``stat`` hanging in the
kernel, and that must neither block the agent nor pile up threads, so a path whose previous check
still hangs is reported unreachable without starting another one.

Disks: ``qemu-img`` through the agent's executor. A disk is created under a temporary name and renamed,
so a crash never leaves a half-made disk at the volume's path. A template's cached copy in a pool (the
base image of overlays) is copied once, under a lock (an asyncio lock in the process, ``flock`` across
processes sharing the pool), to a temporary name and renamed: volumes created at the same time share one
copy, and a reader never sees half of one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import fcntl
import os
import shutil
import threading
import typing as t

from controllers.api.v1alpha1.host import StorageReport

from ...executor import CommandError, Executor, QemuImg, SubprocessExecutor
from ...images import DownloadRequest, DownloadResult, Progress, copy_files, download_template
from . import BaseImageRef, DiskState, StorageError
from .files import COPYING_SUFFIX, unlink_all, write_then_rename

PROBE_PREFIX = ".cumulo-probe-"
CREATING_SUFFIX = ".creating"
VERIFYING_SUFFIX = ".verifying"


def _unreachable(message: str) -> StorageReport:
    return StorageReport(reachable=False, message=message)


def check_directory(path: str, *, create: bool, writable: bool = True) -> StorageReport:
    """Check ``path`` (blocking): exists (created first when ``create``), is a directory, can be
    written (a probe file is created and removed) or, when not ``writable``, read; then the size and
    use of the filesystem holding it."""
    if create and not os.path.lexists(path):
        try:
            os.makedirs(path, mode=0o755, exist_ok=True)
        except OSError as error:
            return _unreachable(f"cannot create directory {path}: {error.strerror or error}")
    try:
        if not os.path.isdir(path):
            if os.path.lexists(path):
                return _unreachable(f"{path} is not a directory")
            return _unreachable(f"directory {path} does not exist")
        if writable:
            probe = os.path.join(path, f"{PROBE_PREFIX}{os.getpid()}-{threading.get_ident()}")
            descriptor = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(descriptor, b"cumulo")
            finally:
                os.close(descriptor)
                os.unlink(probe)
        else:
            os.listdir(path)
        stats = os.statvfs(path)
    except OSError as error:
        verb = "written" if writable else "read"
        return _unreachable(f"directory {path} cannot be {verb}: {error.strerror or error}")
    return StorageReport(
        reachable=True,
        capacity_bytes=stats.f_blocks * stats.f_frsize,
        used_bytes=(stats.f_blocks - stats.f_bfree) * stats.f_frsize,
    )


def copy_base_image(source: str, target: str) -> None:
    """Copy a template image into a pool once (blocking): under an exclusive ``flock`` of ``<target>.lock``,
    to a temporary name, flushed, then renamed. Nothing to do when ``target`` exists."""
    if os.path.exists(target):
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(target):
            return  # another process made it while we waited
        if not os.path.isfile(source):
            raise StorageError(f"template image {source} does not exist")
        temporary = f"{target}.tmp-{os.getpid()}"
        try:
            with open(source, "rb") as reader, open(temporary, "wb") as writer:
                shutil.copyfileobj(reader, writer, 4 * 1024 * 1024)
                writer.flush()
                os.fsync(writer.fileno())
            os.replace(temporary, target)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise StorageError(f"cannot copy template image {source} to {target}: {error.strerror or error}") \
                from None


class FilesystemStorageDriver:
    def __init__(self, *, timeout: float = 15.0, threads: int = 4, executor: Executor | None = None) -> None:
        self.timeout = timeout
        self._threads = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="storage")
        self._hung: dict[str, tuple[concurrent.futures.Future[StorageReport], str]] = {}
        self.qemu_img = QemuImg(executor if executor is not None else SubprocessExecutor())
        self._base_locks: dict[str, asyncio.Lock] = {}

    async def check(self, path: str, *, create: bool, writable: bool = True) -> StorageReport:
        hung = self._hung.get(path)
        if hung is not None:
            future, since = hung
            if not future.done():
                # A fixed time, not a growing duration: an unchanged report costs no status write.
                return _unreachable(f"checking {path} has hung since {since}")
            del self._hung[path]
        future = self._threads.submit(check_directory, path, create=create, writable=writable)
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.timeout)
        except TimeoutError:
            started = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=self.timeout)
            self._hung[path] = (future, started.strftime("%Y-%m-%dT%H:%M:%SZ"))
            return _unreachable(f"checking {path} did not finish within {self.timeout:g}s")

    # -- disks ---------------------------------------------------------------------------------

    async def disk_info(self, path: str) -> DiskState | None:
        if not os.path.exists(path):
            return None
        try:
            info = await self.qemu_img.info(path)
        except CommandError as error:
            if not os.path.exists(path):
                return None  # deleted meanwhile
            raise StorageError(str(error)) from None
        return DiskState(virtual_size=info.virtual_size, physical_size=info.actual_size, format=info.format)

    async def ensure_base_image(self, base: BaseImageRef) -> None:
        if os.path.exists(base.path):
            return
        lock = self._base_locks.setdefault(base.path, asyncio.Lock())
        async with lock:
            await asyncio.to_thread(copy_base_image, base.source, base.path)

    async def create_disk(self, path: str, size_bytes: int, base: BaseImageRef | None = None) -> None:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        except OSError as error:
            raise StorageError(f"cannot create {os.path.dirname(path)}: {error.strerror or error}") from None
        if base is not None:
            await self.ensure_base_image(base)
            try:
                # An overlay smaller than its base would cut the guest's disk short.
                size_bytes = max(size_bytes, (await self.qemu_img.info(base.path)).virtual_size)
            except CommandError as error:
                raise StorageError(f"cannot read the base image {base.path}: {error}") from None
        temporary = path + CREATING_SUFFIX
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)  # left by a crash
        try:
            if base is not None:
                await self.qemu_img.create(temporary, size_bytes, backing=base.path, backing_format=base.format)
            else:
                await self.qemu_img.create(temporary, size_bytes)
            os.replace(temporary, path)
        except CommandError as error:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise StorageError(str(error)) from None

    async def resize_disk(self, path: str, size_bytes: int) -> None:
        try:
            await self.qemu_img.resize(path, size_bytes)
        except CommandError as error:
            raise StorageError(str(error)) from None

    async def delete_disk(self, path: str) -> None:
        # With what an interrupted restore or migration copy may have left next to it.
        unlink_all((path, path + CREATING_SUFFIX, path + COPYING_SUFFIX, path + VERIFYING_SUFFIX,
                     path + VERIFYING_SUFFIX + COPYING_SUFFIX))

    # -- snapshots, reverts, migrations ---------------------------------------------------------------

    async def _convert(self, source: str, target: str, *, compress: bool = False) -> None:
        """``source`` flattened into a new qcow2 ``target`` (written under a temporary name, then renamed)."""
        if not os.path.exists(source):
            raise StorageError(f"{source} does not exist")
        await write_then_rename(target, lambda temporary: self.qemu_img.convert(source, temporary, compress=compress))

    async def snapshot_disk(self, path: str, target: str) -> None:
        await self._convert(path, target)

    async def snapshot_exists(self, target: str) -> bool:
        return os.path.exists(target)

    async def backup_snapshot(self, primary: str, target: str) -> int:
        await self._convert(primary, target, compress=True)
        return os.stat(target).st_size

    async def delete_snapshot(self, location: str) -> None:
        unlink_all((location, location + COPYING_SUFFIX))

    async def restore_disk(self, source: str, path: str) -> None:
        await self._convert(source, path)

    async def copy_disk(self, source: str, target: str) -> None:
        temporary = target + VERIFYING_SUFFIX
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        await self._convert(source, temporary)
        try:
            same = await self.qemu_img.compare(source, temporary) and \
                (await self.qemu_img.info(source)).virtual_size == (await self.qemu_img.info(temporary)).virtual_size
        except CommandError as error:
            unlink_all((temporary,))
            raise StorageError(f"cannot verify the copy: {error}") from None
        if not same:
            unlink_all((temporary,))
            raise StorageError(f"the copy of {source} differs from it; removed")
        os.replace(temporary, target)

    # -- templates ---------------------------------------------------------------------------------

    async def download_template(self, request: DownloadRequest, progress: Progress,
                                cancel: threading.Event) -> DownloadResult:
        return await download_template(request, self.qemu_img, progress, cancel)

    async def delete_template(self, path: str) -> None:
        unlink_all(copy_files(path))

    async def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
