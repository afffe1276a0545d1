"""Volumes: the agent of the host that manages a disk creates, grows and deletes it, and reports
``status.node`` (exists, virtual and physical size, last error).

The controller resolves the target into the Volume's status (``host``, ``path``, ``sizeBytes``,
``baseImage``) and labels the Volume with the host; this reconciler converges the file to it:

* no file: create it, a qcow2 overlay of the pool's cached copy of the template when ``baseImage`` is set
  (the copy is made first, once per pool), else an empty qcow2 of ``sizeBytes``;
* a file smaller than ``sizeBytes``: grow it, with ``qemu-img resize`` when no running domain of the host
  uses it, else with the hypervisor's live block resize (the guest sees the new size at once);
* deletion requested: delete the file (never the shared base image) and report ``exists: false``, which
  lets the controller remove its finalizer.
"""

from __future__ import annotations

import logging
import typing as t

from .drivers.hypervisor import Domain, HypervisorError
from .drivers.storage import BaseImageRef, DiskState, StorageError
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


def base_image(status: t.Mapping[str, t.Any]) -> BaseImageRef | None:
    base = status.get("baseImage")
    if not isinstance(base, t.Mapping) or not base.get("source") or not base.get("path"):
        return None
    return BaseImageRef(source=str(base["source"]), path=str(base["path"]), format=str(base.get("format") or "qcow2"))


class VolumeReconciler(ObjectReconciler):
    kind = "Volume"
    plural = "volumes"
    status_key = "node"

    async def _domain_using(self, host: str, path: str) -> Domain | None:
        worker = self.worker(host)
        assert worker is not None
        for domain in await worker.hypervisor.domains():
            if domain.active and any(disk.path == path for disk in domain.disks):
                return domain
        return None

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
        storage = worker.storage
        previous = status.get("node")
        base = base_image(status)
        if volume["metadata"].get("deletionTimestamp"):
            if base is not None and path == base.path:
                await self.report(key, volume, {"exists": True, "message": f"refusing to delete {path}: it is the "
                                                                            "pool's shared base image"})
                return None
            try:
                user = await self._domain_using(host, path)
                if user is not None:
                    # The controller detaches first; deleting under a running guest would only hide the file.
                    await self.report(key, volume, {"exists": True, "message": f"not deleting the disk: domain "
                                                                                f"{user.name} still uses it"})
                    return self.queue.backoff(key)
                await storage.delete_disk(path)
            except (StorageError, HypervisorError) as error:
                await self.report(key, volume, {"exists": True, "message": f"cannot delete the disk: {error}"})
                return self.queue.backoff(key)
            self.transition(key, "disk", "deleted", logging.INFO, "disk deleted", path=path)
            await self.report(key, volume, {"exists": False, "message": ""})
            return None
        size = status.get("sizeBytes")
        message, delay = "", None
        state: DiskState | None = None
        try:
            state = await storage.disk_info(path)
            if state is None:
                if not size:
                    return None  # the controller does not know the size yet; it writes it when it does
                await storage.create_disk(path, int(size), base)
                self.transition(key, "disk", "created", logging.INFO, "disk created", path=path, size_bytes=size,
                                base=base.path if base else None)
                state = await storage.disk_info(path)
            elif size and state.virtual_size < int(size):
                domain = await self._domain_using(host, path)
                if domain is not None:
                    await worker.hypervisor.block_resize(domain.uuid, path, int(size))
                else:
                    await storage.resize_disk(path, int(size))
                self.transition(key, "size", f"grown {size}", logging.INFO, "disk grown", path=path, size_bytes=size,
                                live=domain is not None)
                state = await storage.disk_info(path)
            self.queue.forget(key)
        except (StorageError, HypervisorError) as error:
            verb = "create" if state is None else "grow"
            message = f"cannot {verb} the disk: {error}"
            self.transition(key, "error", message, logging.WARNING, "disk operation failed", error=str(error))
            delay = self.queue.backoff(key)
        else:
            self._states.pop((key, "error"), None)
        await self.report(key, volume, disk_report(state, message, previous))
        return delay
