"""The RBD storage driver: a pool is a Ceph pool, a volume an RBD image in it, reached with librados/librbd.

One driver per StoragePool (its monitors, Ceph pool, client and key: :class:`RbdAccess`); ``path`` arguments
are image names in that pool. The librados/librbd calls block, so they run in worker threads; the cluster
connection is opened on first use, kept, and shut down by :meth:`RbdStorageDriver.close`.

Templates: a root volume is a copy-on-write clone of the pool's template image. The template image is
imported once per pool from the image store copy (``qemu-img convert`` to raw, under a name of its own, then a
snapshot ``base`` is made and protected, then the image is renamed to its final name: a reader never sees a
half-imported template, and of two hosts importing at once one rename wins and the other drops its copy).
``BaseImageRef.path`` is ``<image>@<snapshot>``; ``BaseImageRef.format`` is the format of the image store
copy (the pool's copy is always raw).

The template image lives as long as a clone needs it: deleting a volume deletes its image, and when that was
the last clone of a template image, the snapshot is unprotected and removed and the template image too (the
next root volume imports it again). So deleting a Template (blocked by the controller while clones exist)
leaves nothing in the pool, and a pool never holds template images nobody uses. No flattening: a clone
shares the template's blocks for its whole life.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import socket
import tempfile
import threading
import time
import typing as t

from controllers.api.v1alpha1.host import StorageReport

from ...executor import CommandError, Executor, SubprocessExecutor, check
from ...images import DownloadRequest, DownloadResult, Progress
from . import BaseImageRef, DiskState, StorageError

TEMPLATE_SNAPSHOT = "base"
TEMPLATE_PREFIX = "template-"
PROBE_OBJECT = "cumulo-probe-{host}"
CONNECT_TIMEOUT = 10
USAGE_INTERVAL = 30.0
"""``ceph df`` (a monitor command) at most this often per pool and host; the probe write runs every check."""


@dataclasses.dataclass(frozen=True)
class RbdAccess:
    """How to reach one Ceph pool: the StoragePool's ``spec.rbd`` with the key read from its Secret."""

    monitors: tuple[str, ...]
    pool: str
    user: str
    key: str = dataclasses.field(repr=False)

    @property
    def where(self) -> str:
        return f"Ceph pool {self.pool} at {','.join(self.monitors)} as client.{self.user}"


def split_snapshot(path: str) -> tuple[str, str]:
    """``image@snapshot`` -> (image, snapshot); the snapshot defaults to :data:`TEMPLATE_SNAPSHOT`."""
    image, _, snapshot = path.partition("@")
    return image, snapshot or TEMPLATE_SNAPSHOT


def is_template_image(image: str, snapshot: str) -> bool:
    """Whether ``image@snapshot`` is a pool's template image (the only parent the driver removes with its last
    clone; a clone of anything else, a volume's snapshot say, leaves its parent alone)."""
    return image.startswith(TEMPLATE_PREFIX) and "." not in image and snapshot == TEMPLATE_SNAPSHOT


def rados_conf(access: RbdAccess) -> dict[str, str]:
    """librados options of a connection (no ceph.conf, no keyring file: nothing of the machine's own Ceph)."""
    return {"mon_host": ",".join(access.monitors), "key": access.key,
            "client_mount_timeout": str(CONNECT_TIMEOUT), "rados_mon_op_timeout": "30",
            "rados_osd_op_timeout": "60"}


def ceph_conf_text(access: RbdAccess, keyring: str) -> str:
    """A ceph.conf for QEMU's rbd driver (``rbd:pool/image:id=…:conf=…``): the key stays in a 0600 keyring file,
    never on a command line."""
    return f"[global]\nmon host = {','.join(access.monitors)}\nkeyring = {keyring}\n"


def keyring_text(access: RbdAccess) -> str:
    return f"[client.{access.user}]\n\tkey = {access.key}\n"


def qemu_uri(access: RbdAccess, image: str, conf: str) -> str:
    """QEMU's legacy rbd filename; ``:`` and ``@`` in values are escaped as QEMU's parser wants."""
    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace(":", "\\:").replace("@", "\\@")
    return f"rbd:{escape(access.pool)}/{escape(image)}:id={escape(access.user)}:conf={escape(conf)}"


def pool_usage(df: t.Mapping[str, t.Any], pool: str) -> tuple[int, int] | None:
    """(capacity, used) bytes of ``pool`` from ``ceph df`` JSON: what the pool holds plus what it can still
    take (``max_avail``: replication and full ratios counted), and what it holds; None if not listed."""
    for entry in df.get("pools") or []:
        if entry.get("name") == pool:
            stats = entry.get("stats") or {}
            used = int(stats.get("bytes_used", stats.get("stored", 0)) or 0)
            return used + int(stats.get("max_avail", 0) or 0), used
    return None


def ceph_message(error: BaseException) -> str:
    """librados/librbd's message (``[errno 13] RADOS permission denied (error connecting to the cluster)``)."""
    return str(error) or type(error).__name__


def _children(ioctx: t.Any, image: str, snapshot: str) -> list[str]:
    """The clones of ``image@snapshot`` (blocking); none when either is missing."""
    import rbd

    try:
        with rbd.Image(ioctx, image, snapshot=snapshot, read_only=True) as handle:
            return sorted(child for _, child in handle.list_children())
    except rbd.ImageNotFound:
        return []


class RbdStorageDriver:
    """A :class:`~hostagent.drivers.storage.StorageDriver` for one Ceph pool."""

    def __init__(self, access: RbdAccess, *, host: str = "", executor: Executor | None = None,
                 threads: int = 4, timeout: float = 30.0) -> None:
        self.access = access
        self.host = host or socket.gethostname()
        self.timeout = timeout
        self.executor = executor if executor is not None else SubprocessExecutor()
        self._threads = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="rbd")
        self._cluster: t.Any = None
        self._connect_lock = threading.Lock()
        self._base_locks: dict[str, asyncio.Lock] = {}
        self._confdir: str | None = None
        self._usage: tuple[float, int, int] | None = None  # (when, capacity, used) from the last ``ceph df``

    # -- plumbing ---------------------------------------------------------------------------------

    async def _call(self, function: t.Callable[..., t.Any], *args: t.Any) -> t.Any:
        future = self._threads.submit(function, *args)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout)
        except TimeoutError:
            raise StorageError(f"{self.access.where}: no answer within {self.timeout:g}s") from None

    def _connect(self) -> t.Any:
        import rados

        with self._connect_lock:
            if self._cluster is not None:
                return self._cluster
            cluster = rados.Rados(rados_id=self.access.user, conf=rados_conf(self.access))
            try:
                cluster.connect(timeout=CONNECT_TIMEOUT)
            except rados.Error as error:
                with contextlib.suppress(Exception):
                    cluster.shutdown()
                raise StorageError(f"cannot connect to {self.access.where}: {ceph_message(error)}") from None
            self._cluster = cluster
            return cluster

    @contextlib.contextmanager
    def ioctx(self) -> t.Iterator[t.Any]:
        """An I/O context on the pool (blocking; for worker threads). Raises StorageError."""
        import rados

        cluster = self._connect()
        try:
            ioctx = cluster.open_ioctx(self.access.pool)
        except rados.ObjectNotFound:
            raise StorageError(f"{self.access.where}: the pool does not exist") from None
        except rados.Error as error:
            raise StorageError(f"{self.access.where}: {ceph_message(error)}") from None
        try:
            yield ioctx
        finally:
            ioctx.close()

    def _conf_path(self) -> str:
        """ceph.conf + keyring for QEMU's rbd driver, in a private directory removed by close()."""
        if self._confdir is None:
            self._confdir = tempfile.mkdtemp(prefix="cumulo-rbd-")
        conf, keyring = os.path.join(self._confdir, "ceph.conf"), os.path.join(self._confdir, "keyring")
        if not os.path.exists(conf):
            descriptor = os.open(keyring, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w") as out:
                out.write(keyring_text(self.access))
            with open(conf, "w") as out:
                out.write(ceph_conf_text(self.access, keyring))
        return conf

    def qemu_uri(self, image: str) -> str:
        return qemu_uri(self.access, image, self._conf_path())

    # -- pool -------------------------------------------------------------------------------------

    def _check(self) -> StorageReport:
        import rados

        try:
            with self.ioctx() as ioctx:
                probe = PROBE_OBJECT.format(host=self.host)
                ioctx.write_full(probe, b"cumulo")
                ioctx.remove_object(probe)
            usage = self._usage
            if usage is None or time.monotonic() - usage[0] >= USAGE_INTERVAL:
                ret, out, _message = self._connect().mon_command(
                    json.dumps({"prefix": "df", "format": "json"}), b"", timeout=15)
                figures = pool_usage(json.loads(out or b"{}"), self.access.pool) if ret == 0 else None
                if figures is None:
                    stats = self._connect().get_cluster_stats()
                    figures = (stats["kb"] * 1024, stats["kb_used"] * 1024)
                usage = self._usage = (time.monotonic(), *figures)
        except StorageError as error:
            return StorageReport(reachable=False, message=str(error))
        except rados.Error as error:
            return StorageReport(reachable=False, message=f"{self.access.where} cannot be written: "
                                                          f"{ceph_message(error)}")
        return StorageReport(reachable=True, capacity_bytes=usage[1], used_bytes=usage[2])

    async def check(self, path: str, *, create: bool, writable: bool = True) -> StorageReport:
        """Connect, open the pool, write and remove a probe object; capacity and use from ``ceph df``.
        ``path`` (the Ceph pool) and ``create`` are the access's: a Ceph pool is never created by an agent."""
        try:
            return await self._call(self._check)
        except StorageError as error:
            return StorageReport(reachable=False, message=str(error))

    # -- disks ------------------------------------------------------------------------------------

    def _disk_info(self, image: str) -> DiskState | None:
        import rbd

        with self.ioctx() as ioctx:
            try:
                with rbd.Image(ioctx, image, read_only=True) as handle:
                    return DiskState(virtual_size=handle.size(), physical_size=None, format="raw")
            except rbd.ImageNotFound:
                return None
            except rbd.Error as error:
                raise StorageError(f"cannot open image {image} in {self.access.where}: {ceph_message(error)}") \
                    from None

    async def disk_info(self, path: str) -> DiskState | None:
        return await self._call(self._disk_info, path)

    def _template_ready(self, image: str, snapshot: str) -> bool:
        import rbd

        with self.ioctx() as ioctx:
            try:
                with rbd.Image(ioctx, image, read_only=True) as handle:
                    return any(s["name"] == snapshot for s in handle.list_snaps()) and \
                        handle.is_protected_snap(snapshot)
            except rbd.ImageNotFound:
                return False

    def _finish_import(self, temporary: str, image: str, snapshot: str) -> None:
        import rbd

        with self.ioctx() as ioctx:
            with rbd.Image(ioctx, temporary) as handle:
                handle.create_snap(snapshot)
                handle.protect_snap(snapshot)
            try:
                rbd.RBD().rename(ioctx, temporary, image)
            except rbd.ImageExists:  # another host imported it meanwhile: keep theirs
                self._remove_template(ioctx, temporary, snapshot)

    def _remove_template(self, ioctx: t.Any, image: str, snapshot: str) -> bool:
        """Unprotect and remove the snapshot and the image, unless a clone still needs it; True if gone."""
        import rbd

        try:
            if _children(ioctx, image, snapshot):
                return False
            with rbd.Image(ioctx, image) as handle:
                if any(s["name"] == snapshot for s in handle.list_snaps()):
                    if handle.is_protected_snap(snapshot):
                        handle.unprotect_snap(snapshot)
                    handle.remove_snap(snapshot)
            rbd.RBD().remove(ioctx, image)
        except rbd.ImageNotFound:
            return True
        except (rbd.ImageBusy, rbd.ImageHasSnapshots):
            return False
        return True

    async def ensure_base_image(self, base: BaseImageRef) -> None:
        image, snapshot = split_snapshot(base.path)
        if await self._call(self._template_ready, image, snapshot):
            return
        lock = self._base_locks.setdefault(base.path, asyncio.Lock())
        async with lock:
            if await self._call(self._template_ready, image, snapshot):
                return
            if not os.path.isfile(base.source):
                raise StorageError(f"template image {base.source} does not exist")
            # Named per host, not per process: a restarted agent removes what its crashed predecessor left.
            temporary = f"{image}.importing-{self.host}"
            await self._call(self._discard, temporary, snapshot)
            argv = ["qemu-img", "convert", "-f", base.format or "qcow2", "-O", "raw", base.source,
                    self.qemu_uri(temporary)]
            try:
                check(await self.executor.run(argv, timeout=3600), "qemu-img convert")
            except CommandError as error:
                await self._call(self._discard, temporary, snapshot)
                raise StorageError(f"cannot import template {base.source} into {self.access.where}: {error}") \
                    from None
            await self._call(self._finish_import, temporary, image, snapshot)

    def _discard(self, image: str, snapshot: str) -> None:
        """Remove a partial import (its snapshot too, if it got that far)."""
        with self.ioctx() as ioctx:
            self._remove_template(ioctx, image, snapshot)

    def _create(self, image: str, size_bytes: int, base: BaseImageRef | None) -> None:
        import rbd

        with self.ioctx() as ioctx:
            try:
                if base is None:
                    rbd.RBD().create(ioctx, image, size_bytes, old_format=False,
                                     features=rbd.RBD_FEATURE_LAYERING)
                    return
                parent, snapshot = split_snapshot(base.path)
                rbd.RBD().clone(ioctx, parent, snapshot, ioctx, image, features=rbd.RBD_FEATURE_LAYERING)
                with rbd.Image(ioctx, image) as handle:
                    if handle.size() < size_bytes:
                        handle.resize(size_bytes)
            except rbd.ImageExists:
                return  # made by an earlier round that did not get to report it
            except rbd.Error as error:
                raise StorageError(f"cannot create image {image} in {self.access.where}: {ceph_message(error)}") \
                    from None

    async def create_disk(self, path: str, size_bytes: int, base: BaseImageRef | None = None) -> None:
        """A plain image of ``size_bytes``, or a clone of ``base``'s template image (imported first if missing),
        grown to ``size_bytes`` when larger than the template."""
        if base is not None:
            await self.ensure_base_image(base)
        await self._call(self._create, path, size_bytes, base)

    def _resize(self, image: str, size_bytes: int) -> None:
        import rbd

        with self.ioctx() as ioctx:
            try:
                with rbd.Image(ioctx, image) as handle:
                    if handle.size() < size_bytes:
                        handle.resize(size_bytes)
            except rbd.Error as error:
                raise StorageError(f"cannot resize image {image}: {ceph_message(error)}") from None

    async def resize_disk(self, path: str, size_bytes: int) -> None:
        await self._call(self._resize, path, size_bytes)

    def _delete(self, image: str) -> None:
        import rbd

        with self.ioctx() as ioctx:
            parent: tuple[str, str] | None = None
            try:
                with rbd.Image(ioctx, image, read_only=True) as handle:
                    with contextlib.suppress(rbd.ImageNotFound):
                        info = handle.parent_info()  # (pool, image, snapshot)
                        if info[0] == self.access.pool and is_template_image(info[1], info[2]):
                            parent = (info[1], info[2])
                rbd.RBD().remove(ioctx, image)
            except rbd.ImageNotFound:
                return
            except rbd.ImageBusy:
                raise StorageError(f"image {image} is in use (a guest or another client has it open)") from None
            except rbd.ImageHasSnapshots:
                raise StorageError(f"image {image} has snapshots; delete them first") from None
            except rbd.Error as error:
                raise StorageError(f"cannot delete image {image}: {ceph_message(error)}") from None
            if parent is not None:
                self._remove_template(ioctx, *parent)  # the last clone of it gone: so is the template image

    async def delete_disk(self, path: str) -> None:
        await self._call(self._delete, path)

    def _children(self, image: str, snapshot: str) -> list[str]:
        with self.ioctx() as ioctx:
            return _children(ioctx, image, snapshot)

    async def clones(self, base_path: str) -> list[str]:
        """The images cloned from the template image ``image@snapshot``."""
        return await self._call(self._children, *split_snapshot(base_path))

    def _images(self) -> list[str]:
        import rbd

        with self.ioctx() as ioctx:
            return sorted(rbd.RBD().list(ioctx))

    async def images(self) -> list[str]:
        return await self._call(self._images)

    # -- templates live on the image store --------------------------------------------------------

    async def download_template(self, request: DownloadRequest, progress: Progress,
                                cancel: threading.Event) -> DownloadResult:
        raise StorageError("templates are downloaded to an image store, not to an RBD pool")

    async def delete_template(self, path: str) -> None:
        raise StorageError("templates are downloaded to an image store, not to an RBD pool")

    async def close(self) -> None:
        cluster, self._cluster = self._cluster, None
        if cluster is not None:
            await asyncio.get_running_loop().run_in_executor(self._threads, cluster.shutdown)
        self._threads.shutdown(wait=False, cancel_futures=True)
        if self._confdir is not None:
            import shutil

            shutil.rmtree(self._confdir, ignore_errors=True)
            self._confdir = None
