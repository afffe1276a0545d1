"""The storage driver interface: pool and image-store directories, volume disks and template copies.

Implementations: :mod:`.filesystem` (real directories and qcow2 files, through ``qemu-img`` run by the
agent's :class:`~hostagent.executor.Executor`) and :mod:`.simulator` (configured capacity, in-memory disks,
fault injection: ``storage``, ``create-volume``, ``resize``, ``download``, ``snapshot``) and :mod:`.rbd` (one
Ceph pool, through librados/librbd; ``path`` is an image name there; with snapshots, reverts and copies in
:mod:`.rbdcopies`, which also copies disks between pools of different drivers).

Disk operations take the controller's resolved target (``status.path``, ``status.sizeBytes``,
``status.baseImage`` of a Volume) and raise :class:`StorageError` with a message fit for a status field.
"""

from __future__ import annotations

import dataclasses
import threading
import typing as t

from controllers.api.v1alpha1.host import StorageReport

from ...images import DownloadRequest, DownloadResult, Progress


class StorageError(Exception):
    """A disk or image operation failed; the message is reported (stable: no durations, no pids)."""


@dataclasses.dataclass(frozen=True)
class BaseImageRef:
    """A template image a disk is an overlay of (``status.baseImage`` of a Volume)."""

    source: str     # the template copy on the image store
    path: str       # the pool's cached copy: the overlay's backing file
    format: str = "qcow2"


@dataclasses.dataclass(frozen=True)
class DiskState:
    """A disk file as found."""

    virtual_size: int
    physical_size: int | None
    format: str


@t.runtime_checkable
class StorageDriver(t.Protocol):
    async def check(self, path: str, *, create: bool, writable: bool = True) -> StorageReport:
        """Check the directory ``path``: create it first when ``create`` (local storage the host
        owns), require write access when ``writable``. Never raises for an unusable directory: the
        report says why (``reachable=False`` with a message)."""
        ...

    async def disk_info(self, path: str) -> DiskState | None:
        """The disk at ``path``, or None when there is no file. Works on disks a running guest uses."""
        ...

    async def create_disk(self, path: str, size_bytes: int, base: BaseImageRef | None = None) -> None:
        """Create a qcow2 disk (an overlay of ``base``'s cached copy, made first if missing)."""
        ...

    async def resize_disk(self, path: str, size_bytes: int) -> None:
        """Grow a disk no running guest uses (for one that is used: the hypervisor's block resize)."""
        ...

    async def delete_disk(self, path: str) -> None:
        """Remove the disk; a missing one is fine."""
        ...

    async def download_template(self, request: DownloadRequest, progress: Progress,
                                cancel: threading.Event) -> DownloadResult:
        """Download and check one template copy (see :mod:`hostagent.images`). Raises
        :class:`~hostagent.images.DownloadError`."""
        ...

    async def delete_template(self, path: str) -> None:
        """Remove a template copy's files (image, boot files, leftovers)."""
        ...

    async def close(self) -> None:
        ...


@t.runtime_checkable
class DiskCopies(t.Protocol):
    """Whole-disk copies: snapshots, reverts, migrations. A separate Protocol so a driver can come without them
    (the agent then reports that its pool type does not support them). RBD maps them to ``rbd snap create`` /
    export to the image store / ``rbd snap rollback`` (:mod:`.rbdcopies`)."""

    async def snapshot_disk(self, path: str, target: str) -> None:
        """Take a point-in-time copy of the disk at ``path``, which no running guest writes, as ``target`` on
        the same pool (filesystem: a flattened qcow2 file; RBD: ``<image>@<snapshot>``). A running guest's
        disk is copied by the hypervisor instead (:meth:`HypervisorDriver.backup_disk`)."""
        ...

    async def snapshot_exists(self, target: str) -> bool:
        """Whether a primary copy made by :meth:`snapshot_disk` exists at ``target``."""
        ...

    async def backup_snapshot(self, primary: str, target: str) -> int:
        """Write the primary copy ``primary`` to the image store as a standalone compressed qcow2 ``target``
        (complete or absent: written under a temporary name); its size in bytes."""
        ...

    async def delete_snapshot(self, location: str) -> None:
        """Remove a snapshot copy (primary or backup); a missing one is fine."""
        ...

    async def restore_disk(self, source: str, path: str) -> None:
        """Make the disk at ``path`` hold the content of the image ``source`` (a snapshot copy): written
        under a temporary name, then put in place of the disk (revert, volume from snapshot)."""
        ...

    async def copy_disk(self, source: str, target: str) -> None:
        """Copy the disk ``source`` to ``target`` (another pool) and verify that both show the guest the same
        bytes and size; ``target`` exists only once verified. Raises :class:`StorageError` on a mismatch."""
        ...
