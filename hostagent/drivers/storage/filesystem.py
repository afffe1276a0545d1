"""The filesystem storage driver: a pool or image store is a directory on the host.

Checks run in worker threads with a deadline: a dead NFS server leaves ``stat`` hanging in the
kernel, and that must neither block the agent nor pile up threads, so a path whose previous check
still hangs is reported unreachable without starting another one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import os
import threading

from controllers.api.v1alpha1.host import StorageReport

PROBE_PREFIX = ".cumulo-probe-"


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


class FilesystemStorageDriver:
    def __init__(self, *, timeout: float = 15.0, threads: int = 4) -> None:
        self.timeout = timeout
        self._threads = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="storage")
        self._hung: dict[str, tuple[concurrent.futures.Future[StorageReport], str]] = {}

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

    async def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
