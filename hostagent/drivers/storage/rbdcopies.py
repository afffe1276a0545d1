"""Whole-disk copies on RBD pools (snapshots, reverts, volumes from snapshots) and copies between pools of any
two drivers (storage migration local <-> RBD, RBD <-> RBD).

:class:`RbdCopiesDriver` is the RBD driver with :class:`~hostagent.drivers.storage.DiskCopies`:

* primary copy: an RBD snapshot ``<image>@snapshot-<uid>`` (``rbd snap create``). It is taken on a running
  guest's image as it is: crash-consistent (what a power cut would leave; no guest freeze);
* backup: the snapshot read through QEMU's rbd driver (``rbd:pool/image@snap``) and written to the image store
  as a standalone compressed qcow2 (``qemu-img convert``), under a temporary name then renamed;
* delete: the RBD snapshot (primary) or the backup file (an absolute path on the image store);
* restore (revert, volume from snapshot): ``rbd snap rollback`` from a kept primary of the same image; from a
  backup, the image is cut to the backup's size and written in place (``qemu-img convert -n``; the agent then
  grows it back to the volume's size, with zeroes), or, for a new volume, written under a temporary image name
  and renamed.

QEMU reaches Ceph through a private ceph.conf + 0600 keyring (the RBD driver's), never a key on a command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import typing as t

from ...executor import CommandError, check
from . import StorageError
from .files import COPYING_SUFFIX, fsync, unlink_all, write_then_rename
from .rbd import RbdStorageDriver, ceph_message

SNAPSHOT_PREFIX = "snapshot-"
MIGRATING_SUFFIX = ".migrating"
RESTORING_SUFFIX = ".restoring"
VERIFYING_SUFFIX = ".verifying"
COPY_TIMEOUT = 6 * 3600


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("@", "\\@")


def split_location(location: str) -> tuple[str, str | None]:
    """``image@snapshot`` -> (image, snapshot); a plain image -> (image, None)."""
    image, _, snapshot = location.partition("@")
    return image, snapshot or None


def is_file(location: str) -> bool:
    """An absolute path (a file on the host: a directory pool or the image store), not an RBD image."""
    return location.startswith("/")


class RbdCopiesDriver(RbdStorageDriver):
    """The RBD driver with snapshots, reverts and copies (:class:`~hostagent.drivers.storage.DiskCopies`)."""

    snapshots_running_disks = True
    """``rbd snap create`` works under a running guest (crash-consistent), no hypervisor backup job needed."""

    def qemu_location(self, location: str) -> str:
        """QEMU's rbd filename of ``image`` or ``image@snapshot`` (read-only then), with the private conf."""
        image, snapshot = split_location(location)
        conf = self._conf_path()
        name = _escape(image) + (f"@{_escape(snapshot)}" if snapshot else "")
        return f"rbd:{_escape(self.access.pool)}/{name}:id={_escape(self.access.user)}:conf={_escape(conf)}"

    async def _qemu_img(self, argv: list[str], what: str) -> None:
        try:
            check(await self.executor.run(["qemu-img", *argv], timeout=COPY_TIMEOUT), what)
        except CommandError as error:
            raise StorageError(str(error)) from None

    # -- blocking librbd helpers --------------------------------------------------------------------------

    def _snaps(self, image: str) -> list[str] | None:
        import rbd

        with self.ioctx() as ioctx:
            try:
                with rbd.Image(ioctx, image, read_only=True) as handle:
                    return [s["name"] for s in handle.list_snaps()]
            except rbd.ImageNotFound:
                return None

    def _snap_create(self, image: str, snapshot: str) -> None:
        import rbd

        with self.ioctx() as ioctx:
            try:
                with rbd.Image(ioctx, image) as handle:
                    if snapshot not in [s["name"] for s in handle.list_snaps()]:
                        handle.create_snap(snapshot)
            except rbd.Error as error:
                raise StorageError(f"cannot snapshot image {image}: {ceph_message(error)}") from None

    def _snap_remove(self, image: str, snapshot: str) -> None:
        import rbd

        with self.ioctx() as ioctx:
            try:
                with rbd.Image(ioctx, image) as handle:
                    if snapshot in [s["name"] for s in handle.list_snaps()]:
                        handle.remove_snap(snapshot)
            except rbd.ImageNotFound:
                return
            except rbd.Error as error:
                raise StorageError(f"cannot remove snapshot {image}@{snapshot}: {ceph_message(error)}") from None

    def _rollback(self, image: str, snapshot: str) -> None:
        import rbd

        with self.ioctx() as ioctx:
            try:
                with rbd.Image(ioctx, image) as handle:
                    handle.rollback_to_snap(snapshot)
            except rbd.Error as error:
                raise StorageError(f"cannot roll {image} back to {snapshot}: {ceph_message(error)}") from None

    def _set_size(self, image: str, size_bytes: int) -> None:
        import rbd

        with self.ioctx() as ioctx:
            try:
                with rbd.Image(ioctx, image) as handle:
                    if handle.size() != size_bytes:
                        handle.resize(size_bytes)
            except rbd.Error as error:
                raise StorageError(f"cannot resize image {image}: {ceph_message(error)}") from None

    def _rename(self, source: str, target: str) -> None:
        import rbd

        with self.ioctx() as ioctx:
            try:
                rbd.RBD().rename(ioctx, source, target)
            except rbd.Error as error:
                raise StorageError(f"cannot rename image {source} to {target}: {ceph_message(error)}") from None

    def _purge(self, image: str) -> None:
        """Remove the image's Cumulo snapshots (kept primaries) so the image itself can go."""
        import rbd

        with self.ioctx() as ioctx:
            try:
                with rbd.Image(ioctx, image) as handle:
                    for snap in handle.list_snaps():
                        if snap["name"].startswith(SNAPSHOT_PREFIX):
                            handle.remove_snap(snap["name"])
            except rbd.ImageNotFound:
                return
            except rbd.Error as error:
                raise StorageError(f"cannot remove the snapshots of {image}: {ceph_message(error)}") from None

    # -- disks: leftovers and kept snapshots go with the image -------------------------------------------

    async def delete_disk(self, path: str) -> None:
        """The image with its kept snapshot primaries (their backups stay on the image store) and what an
        interrupted copy left next to it."""
        for name in (path + MIGRATING_SUFFIX, path + RESTORING_SUFFIX, path):
            await self._call(self._purge, name)
            await super().delete_disk(name)

    # -- DiskCopies -------------------------------------------------------------------------------------

    async def snapshot_disk(self, path: str, target: str) -> None:
        image, snapshot = split_location(target)
        if image != path or not snapshot:
            raise StorageError(f"an RBD snapshot of {path} must be {path}@<name>, not {target}")
        await self._call(self._snap_create, image, snapshot)

    async def snapshot_exists(self, target: str) -> bool:
        image, snapshot = split_location(target)
        snaps = await self._call(self._snaps, image)
        return snaps is not None and snapshot in snaps

    async def backup_snapshot(self, primary: str, target: str) -> int:
        if not await self.snapshot_exists(primary):
            raise StorageError(f"RBD snapshot {primary} does not exist")
        await write_then_rename(target, lambda temporary: self._qemu_img(
            ["convert", "-q", "-f", "raw", "-O", "qcow2", "-c", self.qemu_location(primary), temporary],
            "qemu-img convert"))
        return os.stat(target).st_size

    async def delete_snapshot(self, location: str) -> None:
        if is_file(location):
            unlink_all((location, location + COPYING_SUFFIX))
            return
        image, snapshot = split_location(location)
        if snapshot:
            await self._call(self._snap_remove, image, snapshot)

    async def restore_disk(self, source: str, path: str) -> None:
        exists = await self.disk_info(path) is not None
        if not is_file(source):
            image, snapshot = split_location(source)
            if image == path and snapshot and exists:
                await self._call(self._rollback, image, snapshot)
                return
        if exists:
            # In place (the image may hold other snapshots, so it cannot be replaced): cut to the copy's size
            # first, so nothing of the current disk remains beyond it.
            size = await self._virtual_size(source)
            await self._call(self._set_size, path, size)
            await self._qemu_img(["convert", "-q", "-n", "-f", _format_of(source), "-O", "raw",
                                  self._qemu_source(source), self.qemu_location(path)], "qemu-img convert")
            return
        temporary = path + RESTORING_SUFFIX
        await super().delete_disk(temporary)  # left by a crash
        try:
            await self._qemu_img(["convert", "-q", "-f", _format_of(source), "-O", "raw", self._qemu_source(source),
                                  self.qemu_location(temporary)], "qemu-img convert")
            await self._call(self._rename, temporary, path)
        except StorageError:
            with contextlib.suppress(StorageError):
                await super().delete_disk(temporary)
            raise

    async def copy_disk(self, source: str, target: str) -> None:
        await copy_across(self, source, self, target)

    def _qemu_source(self, source: str) -> str:
        return source if is_file(source) else self.qemu_location(source)

    async def _virtual_size(self, source: str) -> int:
        try:
            result = check(await self.executor.run(["qemu-img", "info", "--output=json", "-U", "-f",
                                                    _format_of(source), self._qemu_source(source)]),
                           "qemu-img info")
        except CommandError as error:
            raise StorageError(str(error)) from None
        return int(json.loads(result.stdout)["virtual-size"])


def _format_of(location: str) -> str:
    return "qcow2" if is_file(location) else "raw"



def _location(driver: t.Any, path: str) -> tuple[str, str]:
    """(QEMU filename, format) of a disk of ``driver``: an RBD image (raw) or a directory pool's qcow2 file."""
    if isinstance(driver, RbdCopiesDriver):
        return driver.qemu_location(path), "raw"
    return path, "qcow2"


async def copy_across(source_driver: t.Any, source: str, target_driver: t.Any, target: str) -> None:
    """Copy the disk ``source`` of one pool to ``target`` of another (either may be RBD): written under a
    temporary name, compared with ``qemu-img compare`` (content and virtual size), then renamed to ``target``;
    a mismatch removes the copy. The source is left alone. The guest must be stopped (the caller checks)."""
    rbd_target = isinstance(target_driver, RbdCopiesDriver)
    if not rbd_target and not is_file(target):
        raise StorageError(f"cannot copy to {target}: not a file path")
    executor = (source_driver if isinstance(source_driver, RbdCopiesDriver) else target_driver).executor \
        if rbd_target or isinstance(source_driver, RbdCopiesDriver) else None
    if executor is None:  # two directory pools: the driver's own copy
        await source_driver.copy_disk(source, target)
        return
    temporary = target + (MIGRATING_SUFFIX if rbd_target else VERIFYING_SUFFIX)
    await _remove(target_driver, temporary)
    if not rbd_target:
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(target), exist_ok=True)
    src, src_format = _location(source_driver, source)
    dst, dst_format = _location(target_driver, temporary)

    async def run(argv: list[str], what: str) -> t.Any:
        try:
            return await executor.run(["qemu-img", *argv], timeout=COPY_TIMEOUT)
        except CommandError as error:
            raise StorageError(f"{what}: {error}") from None

    try:
        check(await run(["convert", "-q", "-f", src_format, "-O", dst_format, src, dst], "qemu-img convert"),
              "qemu-img convert")
        if not rbd_target:
            await asyncio.to_thread(fsync, temporary)
        # Content (not -s: a raw image and a qcow2 file never agree on allocation), then the virtual sizes.
        compared = await run(["compare", "-q", "-f", src_format, "-F", dst_format, src, dst], "qemu-img compare")
        if compared.returncode != 0:
            detail = "differs" if compared.returncode == 1 else f"cannot be compared: {compared.stderr.strip()}"
            raise StorageError(f"the copy of {source} {detail}; removed")
        sizes = []
        for location, fmt in ((src, src_format), (dst, dst_format)):
            info = check(await run(["info", "--output=json", "-U", "-f", fmt, location], "qemu-img info"),
                         "qemu-img info")
            sizes.append(json.loads(info.stdout)["virtual-size"])
        if sizes[0] != sizes[1]:
            raise StorageError(f"the copy of {source} has {sizes[1]} bytes, not {sizes[0]}; removed")
        if rbd_target:
            await target_driver._call(target_driver._rename, temporary, target)
        else:
            os.replace(temporary, target)
    except (StorageError, CommandError, OSError) as error:
        with contextlib.suppress(StorageError, OSError):
            await _remove(target_driver, temporary)
        raise StorageError(str(error)) from None


async def _remove(driver: t.Any, path: str) -> None:
    if isinstance(driver, RbdCopiesDriver):
        await RbdStorageDriver.delete_disk(driver, path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
