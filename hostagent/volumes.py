"""Volumes: the agent of the host that manages a disk creates, grows and deletes it, and reports
``status.node`` (exists, virtual and physical size, last error).

The controller resolves the target into the Volume's status (``host``, ``path``, ``sizeBytes``,
``baseImage``) and labels the Volume with the host; this reconciler converges the file to it:

* no file: create it, a qcow2 overlay of the pool's cached copy of the template when ``baseImage`` is set
  (the copy is made first, once per pool), else an empty qcow2 of ``sizeBytes``;
* a file smaller than ``sizeBytes``: grow it, with ``qemu-img resize`` when no running domain of the host
  uses it, else with the hypervisor's live block resize (the guest sees the new size at once);
* deletion requested: delete the file (never the shared base image) and report ``exists: false``, which
  lets the controller remove its finalizer;
* ``sourceImage`` (a volume made from a snapshot): the new disk is a copy of that backup;
* ``revert`` (the guest is stopped): the disk is rewritten from the snapshot's copy, reported as
  ``node.reverted``;
* ``migration``: ``Copying``: the source is copied to the target pool and verified equal (``node.migrated``);
  the controller then switches ``path`` to the copy (``CleaningUp``) and the source is deleted
  (``node.sourceRemoved``). A copy cut short (agent killed) is redone; the source stays until the switch.
  Source and target are each reached through their own pool's driver (``migration.sourceRbd`` / ``rbd``: an RBD
  pool's Ceph access), so a disk moves between a directory pool and an RBD pool too (:func:`copy_across`).

The driver is the pool's: the host's own for directories, the pool's RBD driver (:mod:`.rbdpools`) when
``status.rbd`` is set (path: the image name; base image: the pool's template image snapshot it is cloned from).
"""

from __future__ import annotations

import logging
import typing as t

from .drivers.hypervisor import Domain, HypervisorError
from .drivers.storage import BaseImageRef, DiskCopies, DiskState, StorageError
from .drivers.storage.rbdcopies import copy_across
from .reconciler import ObjectReconciler

log = logging.getLogger(__name__)

PHYSICAL_SIZE_TOLERANCE = 16 * 1024**2
"""A running guest's disk grows with every write; a change of the physical size smaller than this (or 1%
of the virtual size) is not worth a status write on its own."""


def disk_report(state: DiskState | None, message: str, previous: t.Mapping[str, t.Any] | None) -> dict[str, t.Any]:
    """``status.node`` of a Volume (the DiskReport model's JSON), keeping the previously reported physical
    size while it moved less than the tolerance."""
    if state is None:
        return {"exists": False, "message": message}
    physical = state.physical_size
    old = (previous or {}).get("physicalSizeBytes")
    if physical is not None and isinstance(old, int) and (previous or {}).get("exists") and \
            abs(physical - old) < max(PHYSICAL_SIZE_TOLERANCE, state.virtual_size // 100):
        physical = old
    return {"exists": True, "sizeBytes": state.virtual_size, "physicalSizeBytes": physical, "message": message}


OPERATION_KEYS = ("reverted", "migrated", "sourceRemoved")
"""Report keys recording finished one-shot operations: kept in every report."""


def base_image(status: t.Mapping[str, t.Any]) -> BaseImageRef | None:
    base = status.get("baseImage")
    if not isinstance(base, t.Mapping) or not base.get("source") or not base.get("path"):
        return None
    return BaseImageRef(source=str(base["source"]), path=str(base["path"]), format=str(base.get("format") or "qcow2"))


class VolumeReconciler(ObjectReconciler):
    kind = "Volume"
    plural = "volumes"
    status_key = "node"

    async def _domain_using(self, host: str, path: str, rbd: t.Mapping[str, t.Any] | None = None) -> Domain | None:
        if rbd:
            path = f"{rbd.get('pool')}/{path}"  # an RBD disk is pool/image in the domain
        worker = self.worker(host)
        assert worker is not None
        for domain in await worker.hypervisor.domains():
            if domain.active and any(disk.path == path for disk in domain.disks):
                return domain
        return None

    def disks_pending(self, namespace: str, disks: t.Iterable[t.Any]) -> list[str]:
        """Disks of a launch (LaunchDisk) whose Volumes are bound to this agent and not created yet (or not yet
        grown to the launch's size), by what this agent last reported. A Volume not bound here is not waited
        for: the start's own checks apply to it."""
        pending = []
        for disk in disks:
            key = f"{namespace}/{disk.volume}"
            volume = self.informer.cache.get(key)
            if volume is None or self.bound_host(volume) is None:
                continue
            report = self.last_report(key, volume) or {}
            if not report.get("exists") or (report.get("sizeBytes") or 0) < (disk.size_bytes or 0):
                pending.append(disk.volume)
        return pending

    def on_event(self, kind: str, key: str, old: dict[str, t.Any] | None, new: dict[str, t.Any] | None) -> None:
        if new is not None and ((new.get("status") or {}).get("node") or {}).get("exists"):
            self.wake_guest(key, new)

    def wake_guest(self, key: str, volume: t.Mapping[str, t.Any]) -> None:
        """A guest of this agent waiting for the disk (see :meth:`disks_pending`) looks again."""
        name = ((volume.get("spec") or {}).get("virtualMachine") or {}).get("name")
        if name:
            self.agent.vms.queue.add(f"{key.partition('/')[0]}/{name}")

    async def reconcile(self, key: str, volume: dict[str, t.Any] | None) -> float | None:
        if volume is None:
            self.forget_states(key)
            self.queue.forget(key)
            return None
        status = volume.get("status") or {}
        host, path = status.get("host"), status.get("path")
        worker = self.worker(host)
        if worker is None or not path:
            return None  # not (yet) a disk of this agent's hosts
        previous = status.get("node")
        base = base_image(status)
        rbd = status.get("rbd")
        try:
            storage = await worker.storage_for(status.get("storagePool"), rbd)
        except StorageError as error:
            await self.report(key, volume, {**(previous or {"exists": False}), "message": str(error)})
            return self.queue.backoff(key)
        if volume["metadata"].get("deletionTimestamp"):
            if base is not None and path == base.path:
                await self.report(key, volume, {"exists": True, "message": f"refusing to delete {path}: it is the "
                                                                            "pool's shared base image"})
                return None
            try:
                user = await self._domain_using(host, path, rbd)
                if user is not None:
                    # The controller detaches first; deleting under a running guest would only hide the file.
                    await self.report(key, volume, {"exists": True, "message": f"not deleting the disk: domain "
                                                                                f"{user.name} still uses it"})
                    return self.queue.backoff(key)
                await storage.delete_disk(path)
                # A storage migration cut short by the deletion: its copy (or its not yet removed source) too,
                # each on its own pool.
                migration = status.get("migration") or {}
                for extra, pool, access in ((migration.get("path"), migration.get("storagePool"), migration.get("rbd")),
                                            (migration.get("sourcePath"), migration.get("sourcePool"),
                                             migration.get("sourceRbd"))):
                    if extra and extra != path and (base is None or extra != base.path):
                        await (await self._pool_storage(worker, pool, access, storage)).delete_disk(extra)
            except (StorageError, HypervisorError) as error:
                await self.report(key, volume, {"exists": True, "message": f"cannot delete the disk: {error}"})
                return self.queue.backoff(key)
            self.transition(key, "disk", "deleted", logging.INFO, "disk deleted", path=path)
            await self.report(key, volume, {"exists": False, "message": ""})
            return None
        size = status.get("sizeBytes")
        message, delay = "", None
        state: DiskState | None = None
        done = {k: v for k, v in (previous or {}).items() if k in OPERATION_KEYS}
        verb = "create"
        try:
            migration = status.get("migration") or {}
            if (migration or status.get("revert") or status.get("sourceImage")) and not isinstance(storage, DiskCopies):
                raise StorageError(f"the {type(storage).__name__} cannot copy whole disks")
            if migration.get("state") == "Copying" and done.get("migrated") != migration.get("path"):
                verb = "migrate"
                await self._unused(host, migration["sourcePath"], "migrating")
                self.transition(key, "migration", "copying", logging.INFO, "copying the disk to another pool",
                                source=migration["sourcePath"], target=migration["path"])
                source_storage = await self._pool_storage(worker, migration.get("sourcePool"),
                                                          migration.get("sourceRbd"), storage)
                target_storage = await self._pool_storage(worker, migration.get("storagePool"),
                                                          migration.get("rbd"), storage)
                await copy_across(source_storage, migration["sourcePath"], target_storage, migration["path"])
                done["migrated"] = migration["path"]
                self.transition(key, "migration", "verified", logging.INFO, "disk copy verified",
                                target=migration["path"])
            elif migration.get("state") == "CleaningUp" and done.get("sourceRemoved") != migration.get("sourcePath") \
                    and migration.get("sourcePath") != path:
                verb = "remove the migration source of"
                await (await self._pool_storage(worker, migration.get("sourcePool"), migration.get("sourceRbd"),
                                                storage)).delete_disk(migration["sourcePath"])
                done["sourceRemoved"] = migration["sourcePath"]
                self.transition(key, "migration", "done", logging.INFO, "migration source removed",
                                source=migration["sourcePath"])
            state = await storage.disk_info(path)
            revert = status.get("revert") or {}
            if state is not None and revert.get("id") and done.get("reverted") != revert["id"]:
                verb = "revert"
                await self._unused(host, path, "reverting")
                await storage.restore_disk(revert["source"], path)
                done["reverted"] = revert["id"]
                self.transition(key, "revert", revert["id"], logging.INFO, "disk reverted to a snapshot",
                                path=path, snapshot=revert.get("snapshot"))
                state = await storage.disk_info(path)
            verb = "create"
            if state is None:
                if not size:
                    return None  # the controller does not know the size yet; it writes it when it does
                source = status.get("sourceImage")
                if source:
                    await storage.restore_disk(source, path)
                else:
                    await storage.create_disk(path, int(size), base)
                self.transition(key, "disk", "created", logging.INFO, "disk created", path=path, size_bytes=size,
                                base=base.path if base else None, source=source)
                state = await storage.disk_info(path)
                verb = "grow"
            if state is not None and size and state.virtual_size < int(size):
                verb = "grow"
                domain = await self._domain_using(host, path, rbd)
                if domain is not None:
                    await worker.hypervisor.block_resize(domain.uuid, f"{rbd['pool']}/{path}" if rbd else path,
                                                         int(size))
                else:
                    await storage.resize_disk(path, int(size))
                self.transition(key, "size", f"grown {size}", logging.INFO, "disk grown", path=path, size_bytes=size,
                                live=domain is not None)
                state = await storage.disk_info(path)
            self.queue.forget(key)
        except (StorageError, HypervisorError) as error:
            message = f"cannot {verb} the disk: {error}"
            self.transition(key, "error", message, logging.WARNING, "disk operation failed", error=str(error))
            delay = self.queue.backoff(key)
            if state is None:
                try:  # the report must say whether the disk exists, whatever step failed
                    state = await storage.disk_info(path)
                except StorageError:
                    return delay
        else:
            self._states.pop((key, "error"), None)
        await self.report(key, volume, {**disk_report(state, message, previous), **done})
        if state is not None:
            self.wake_guest(key, volume)
        return delay

    @staticmethod
    async def _pool_storage(worker: t.Any, pool: str | None, rbd: t.Mapping[str, t.Any] | None,
                            current: t.Any) -> t.Any:
        """The driver of a migration's source or target pool (``rbd``: its Ceph access, when RBD); the
        volume's current driver when the migration predates these fields."""
        if pool is None:
            return current
        return await worker.storage_for(pool, rbd)

    async def _unused(self, host: str, path: str, what: str) -> None:
        """Refuse to rewrite or move a disk a running domain has open (the controller waits for the guest to
        stop; this is the last check)."""
        domain = await self._domain_using(host, path)
        if domain is not None:
            raise StorageError(f"not {what}: domain {domain.name} is running on the disk")
