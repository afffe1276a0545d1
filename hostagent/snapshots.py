"""Snapshots: the agent of the volume's host takes the primary copy, backs it up to the image store, removes the
primary copy unless it is kept, and removes both when the Snapshot is deleted; it reports under ``status.node``
(SnapshotReport).

The controller resolves everything first (``status.host``, ``status.disk``, ``status.primary.path``,
``status.secondary.path``) and labels the Snapshot with the host. Each step is idempotent and written under a
temporary name, so an agent killed at any point redoes at most the step it was in:

* not taken: a disk no running domain uses is copied by the storage driver (``qemu-img convert``; RBD: ``rbd
  snap create``); a running guest's disk by the hypervisor's backup job, the guest running on. A primary copy
  found in place (taken, then the agent died before reporting) counts as taken. On RBD the driver's snapshot
  is taken under a running guest too (crash-consistent: what a power cut would leave);
* taken, not backed up: the primary copy is written to the image store as a compressed standalone qcow2;
* backed up, ``keepOnPrimary`` false: the primary copy is removed.
"""

from __future__ import annotations

import datetime
import logging
import typing as t

from .drivers.hypervisor import HypervisorError
from .drivers.storage import DiskCopies, StorageError
from .reconciler import ObjectReconciler

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class SnapshotReconciler(ObjectReconciler):
    kind = "Snapshot"
    plural = "snapshots"
    status_key = "node"

    def _rbd_of(self, pool: str | None) -> dict[str, t.Any] | None:
        """The ``spec.rbd`` of StoragePool ``pool`` when it is an RBD pool (from the agent's pool cache)."""
        for found in self.agent.pools.cache.values():
            spec = found.get("spec") or {}
            if pool and found["metadata"]["name"] == pool and spec.get("type") == "RBD" and spec.get("rbd"):
                return t.cast(dict[str, t.Any], spec["rbd"])
        return None

    async def reconcile(self, key: str, snapshot: dict[str, t.Any] | None) -> float | None:
        if snapshot is None:
            self.forget_states(key)
            self.queue.forget(key)
            return None
        status = snapshot.get("status") or {}
        worker = self.worker(status.get("host"))
        primary = (status.get("primary") or {}).get("path")
        secondary = (status.get("secondary") or {}).get("path")
        disk = status.get("disk")
        if worker is None or not secondary or not disk:
            return None  # not handed to this agent (yet)
        # The controller drops status.primary once the agent reported it removed; the primary path is then
        # not needed any more (and a deletion removes only the backup).
        storage = worker.storage
        rbd = self._rbd_of((status.get("primary") or {}).get("store"))
        if rbd is not None:  # an RBD volume's snapshot: the primary copy is an RBD snapshot, through the pool
            try:
                storage = await worker.storage_for(status["primary"]["store"], rbd)
            except StorageError as error:
                await self.report(key, snapshot, {**dict(status.get("node") or {}), "message": f"snapshot failed: "
                                                                                            f"{error}"})
                return self.queue.backoff(key)
        report = dict(status.get("node") or {})
        report.pop("message", None)
        if not isinstance(storage, DiskCopies):
            await self.report(key, snapshot, {**report, "message": f"the {type(storage).__name__} cannot take "
                                                                    "snapshots"})
            return None
        try:
            if snapshot["metadata"].get("deletionTimestamp"):
                if not report.get("deleted"):
                    if primary:
                        await storage.delete_snapshot(primary)
                    await storage.delete_snapshot(secondary)
                    self.transition(key, "step", "deleted", logging.INFO, "snapshot copies removed",
                                    primary=primary, secondary=secondary)
                    await self.report(key, snapshot, {**report, "deleted": True, "message": ""})
                return None
            if not primary:
                return None  # removed after the backup: nothing left to do but a deletion
            if not report.get("taken"):
                live = False
                if not await storage.snapshot_exists(primary):
                    domain = next((d for d in await worker.hypervisor.domains()
                                   if d.active and any(x.path == disk for x in d.disks)), None)
                    if domain is not None and not getattr(storage, "snapshots_running_disks", False):
                        await worker.hypervisor.backup_disk(domain.uuid, disk, primary)
                    else:
                        # RBD: ``rbd snap create`` under the running guest too (crash-consistent).
                        await storage.snapshot_disk(disk, primary)
                    live = domain is not None
                state = await storage.disk_info(disk)
                report.update(taken=True, live=live, takenAt=_now(),
                              sizeBytes=state.virtual_size if state else None)
                self.transition(key, "step", "taken", logging.INFO, "snapshot taken", disk=disk, primary=primary,
                                live=live)
                await self.report(key, snapshot, {**report, "message": ""})
            if not report.get("backedUp"):
                size = await storage.backup_snapshot(primary, secondary)
                report.update(backedUp=True, physicalSizeBytes=size)
                self.transition(key, "step", "backed up", logging.INFO, "snapshot backed up", secondary=secondary,
                                bytes=size)
                await self.report(key, snapshot, {**report, "message": ""})
            keep = bool((snapshot.get("spec") or {}).get("keepOnPrimary"))
            if not keep and not report.get("primaryRemoved"):
                await storage.delete_snapshot(primary)
                report.update(primaryRemoved=True)
                await self.report(key, snapshot, {**report, "message": ""})
            self.queue.forget(key)
        except (StorageError, HypervisorError, OSError) as error:
            message = f"snapshot failed: {error}"
            self.transition(key, "error", message, logging.WARNING, "snapshot step failed", error=str(error))
            await self.report(key, snapshot, {**report, "message": message})
            return self.queue.backoff(key)
        self._states.pop((key, "error"), None)
        return None
