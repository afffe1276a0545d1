"""Volume reconciler: resolves where a disk lives and hands it to the agent of the host that manages it.

A data volume stays Allocated (no pool, no disk) until it is attached to a placed guest, then goes to a
pool that guest's host reaches; a root volume gets the pool the planner chose with its guest. The
controller writes the resolved target (pool, host, path, size, base image) into status and labels the
volume with the host; that host's agent creates, resizes and deletes the disk and reports in
``status.node``.
"""

from __future__ import annotations

import math
import typing as t

from controllers import inventory, kinds
from controllers.api.v1alpha1 import Volume
from controllers.api.v1alpha1.host import HOST_LABEL, HostState
from controllers.api.v1alpha1.storagepool import PoolScope, PoolType, StoragePool
from controllers.api.v1alpha1.template import ImageFormat, TemplateState
from controllers.api.v1alpha1.volume import BaseImage, VolumePhase, VolumeStatus, VolumeType
from controllers.conditions import Check, first_failure
from controllers.reconcilers.base import InventoryReconciler

GIB = 1024**3


def disk_path(pool: StoragePool, volume: Volume) -> str:
    return f"{pool.spec.path.rstrip('/')}/{volume.metadata.uid}.qcow2"


def base_image_path(pool: StoragePool, template_uid: str, fmt: ImageFormat) -> str:
    return f"{pool.spec.path.rstrip('/')}/templates/{template_uid}.{'raw' if fmt == ImageFormat.RAW else 'qcow2'}"


class VolumeReconciler(InventoryReconciler):
    kind = kinds.VOLUMES
    agent_status_keys = ("node",)
    progress_reasons = frozenset({"Creating"})

    def setup(self) -> None:
        super().setup()
        self.index("volumes", "vm", lambda v: [f"{v.metadata.namespace}/{v.spec.virtual_machine.name}"]
                   if v.spec.virtual_machine else [])
        self.index("volumes", "fromTemplate", lambda v: [
            f"{v.spec.from_template.namespace or v.metadata.namespace}/{v.spec.from_template.name}"]
            if v.spec.from_template else [])
        self.index("volumes", ".status.storagePool", lambda v: [v.status.storage_pool] if v.status.storage_pool else [])

    def watch_map(self):
        def of_vm(vm):
            return [self.key(v.metadata.name, v.metadata.namespace) for v in
                    self.store.by("volumes", "vm", f"{vm.metadata.namespace}/{vm.metadata.name}")]

        def from_template(template):
            return [self.key(v.metadata.name, v.metadata.namespace) for v in
                    self.store.by("volumes", "fromTemplate", f"{template.metadata.namespace}/{template.metadata.name}")]

        def on_pool(pool):
            return [self.key(v.metadata.name, v.metadata.namespace) for v in
                    self.store.by("volumes", ".status.storagePool", pool.metadata.name)]

        return {"virtualmachines": of_vm, "templates": from_template, "storagepools": on_pool}

    # -- what the volume needs ------------------------------------------------------------------

    def _vm(self, volume: Volume):
        ref = volume.spec.virtual_machine
        return self.store.get("virtualmachines", ref.name, volume.metadata.namespace) if ref else None

    def _template(self, volume: Volume):
        ref = volume.spec.from_template
        return self.store.get("templates", ref.name, ref.namespace or volume.metadata.namespace) if ref else None

    def _wanted_bytes(self, volume: Volume, template: t.Any) -> tuple[int | None, str]:
        if volume.spec.size_gib:
            return volume.spec.size_gib * GIB, ""
        if volume.spec.disk_offering:
            offering = self.store.get("diskofferings", volume.spec.disk_offering)
            if offering is None:
                return None, f"DiskOffering {volume.spec.disk_offering} does not exist"
            if offering.spec.disk_size_gib:
                return offering.spec.disk_size_gib * GIB, ""
            return None, f"DiskOffering {volume.spec.disk_offering} is customized: give sizeGiB"
        if template is not None and template.status.virtual_size_bytes:
            return template.status.virtual_size_bytes, ""
        return None, "the size is not known yet"

    def _pool(self, volume: Volume, vm: t.Any) -> tuple[StoragePool | None, str]:
        name = volume.status.storage_pool or volume.spec.storage_pool
        if name:
            pool = self.store.get("storagepools", name)
            return pool, "" if pool else f"StoragePool {name} does not exist"
        if vm is None or vm.status.placement is None or vm.status.placement.host is None:
            return None, "a data volume gets its pool when it is attached to a placed guest"
        return self._choose_pool(volume, vm.status.placement.host)

    def _choose_pool(self, volume: Volume, host: str) -> tuple[StoragePool | None, str]:
        offering = self.store.get("diskofferings", volume.spec.disk_offering) if volume.spec.disk_offering else None
        local = offering is not None and offering.spec.storage_type.value == "local"
        tags = set(offering.spec.tags) if offering else set()
        candidates = [p for p in self.store.list("storagepools")
                      if p.spec.enabled and p.spec.zone == volume.spec.zone and set(p.spec.tags) >= tags
                      and (p.spec.scope == PoolScope.HOST) == local
                      and (access := p.status.host_access.get(host)) is not None and access.reachable]
        if not candidates:
            kind = "local" if local else "shared"
            return None, f"host {host} reaches no enabled {kind} pool matching the disk offering"
        free = lambda p: (p.status.capacity_bytes or 0) * p.spec.overprovisioning_factor - (p.status.allocated_bytes or 0)  # noqa: E731
        return max(candidates, key=lambda p: (free(p), p.metadata.name)), ""

    def _host(self, pool: StoragePool, vm: t.Any) -> str | None:
        if pool.spec.scope == PoolScope.HOST:
            return pool.spec.host
        if vm is not None and vm.status.placement and vm.status.placement.host:
            return vm.status.placement.host
        for name, access in sorted(pool.status.host_access.items()):
            host = self.store.get("hosts", name)
            if access.reachable and host is not None and host.status.state == HostState.UP:
                return name
        return None

    def _base_image(self, pool: StoragePool, template: t.Any) -> tuple[BaseImage | None, str]:
        copy = next((c for c in template.status.zones if c.zone == pool.spec.zone), None)
        if copy is None or copy.state != TemplateState.READY:
            return None, f"Template {template.metadata.name} is not Ready in zone {pool.spec.zone} yet"
        fmt = template.spec.format
        return BaseImage(source=copy.path, path=base_image_path(pool, template.metadata.uid, fmt),
                         format="raw" if fmt == ImageFormat.RAW else "qcow2"), ""

    # -- reconcile ------------------------------------------------------------------------------

    def derive(self, volume: Volume, ctx: inventory.Context) -> VolumeStatus:
        vm = self._vm(volume)
        template = self._template(volume)
        previous = volume.status
        status = VolumeStatus(observed_generation=volume.metadata.generation, conditions=previous.conditions,
                              node=previous.node, attached_to=previous.attached_to, device_id=previous.device_id)
        pool, why = self._pool(volume, vm)
        wanted, size_why = self._wanted_bytes(volume, template)
        checks: list[Check] = []
        if volume.spec.from_template and template is None:
            checks.append(Check.failed("TemplateNotFound", f"Template {volume.spec.from_template.name} does not exist"))
        if pool is None:
            checks.append(Check.failed("NoPool" if volume.spec.storage_pool or volume.status.storage_pool
                                       else "Allocated", why))
        elif pool.spec.type == PoolType.RBD:
            checks.append(Check.failed("PoolTypeNotSupported", "RBD volumes are not supported yet"))
        if wanted is None:
            checks.append(Check.failed("SizeUnknown", size_why))
        base = None
        if pool is not None and template is not None and pool.spec.type != PoolType.RBD:
            base, base_why = self._base_image(pool, template)
            if base is None:
                checks.append(Check.failed("TemplateNotReady", base_why))
        if pool is not None and pool.spec.type != PoolType.RBD:
            # The pool is fixed once recorded; the rest of the target follows from it.
            status.storage_pool = pool.metadata.name
            status.host = self._host(pool, vm)
            status.path = previous.path or disk_path(pool, volume)
            status.format = "qcow2"
            status.size_bytes = max(wanted or 0, previous.size_bytes or 0) or None
            status.base_image = base or previous.base_image
            if status.host is None:
                checks.append(Check.failed("NoHost", f"no Up host reaches pool {pool.metadata.name}"))
        node = volume.status.node
        if node is not None and node.message:
            checks.append(Check.failed("DiskError", node.message))
        elif not checks and (node is None or not node.exists):
            checks.append(Check.failed("Creating", f"the agent of {status.host} is creating the disk"))
        elif not checks and node.size_bytes is not None and status.size_bytes and node.size_bytes < status.size_bytes:
            checks.append(Check.failed("Resizing", f"growing the disk to {math.ceil(status.size_bytes / GIB)} GiB"))
        ready = first_failure(*checks) if checks else Check.passed("Ready")
        attached = vm is not None and vm.status.node is not None and volume.metadata.name in vm.status.node.disks
        status.attached_to = vm.metadata.name if attached else None
        status.physical_size_bytes = node.physical_size_bytes if node else None
        if ctx.deleting:
            status.phase = "Deleting"
        elif ready.ok:
            status.phase = (VolumePhase.ATTACHED if attached else VolumePhase.READY).value
        elif ready.reason == "Allocated":
            status.phase = VolumePhase.ALLOCATED.value
        elif ready.reason == "DiskError":
            status.phase = VolumePhase.ERROR.value
        else:
            status.phase = VolumePhase.CREATING.value if status.path else VolumePhase.ALLOCATED.value
        status.conditions = inventory.conditions(previous.conditions, volume.metadata.generation, ctx, ready)
        return status

    def blocked_by(self, volume: Volume) -> list[str]:
        vm = self._vm(volume)
        if vm is None or vm.metadata.deletion_timestamp is not None:
            return []
        if volume.spec.type == VolumeType.ROOT:
            return [f"VirtualMachine {vm.metadata.namespace}/{vm.metadata.name} (its root disk)"]
        if vm.status.node is not None and volume.metadata.name in vm.status.node.disks:
            return [f"VirtualMachine {vm.metadata.namespace}/{vm.metadata.name} (attached; remove "
                    "spec.virtualMachine to detach)"]
        return []

    async def finalize(self, volume: Volume) -> bool:
        """The disk's agent deletes it first. A volume never handed to an agent needs nothing; one handed
        over waits for the agent's report, since it may be creating the disk right now."""
        node = volume.status.node
        if not volume.status.path or (node is not None and not node.exists):
            return True
        host = volume.status.host
        if host and volume.metadata.labels.get(HOST_LABEL) != host:
            await self.runtime.api.set_label(self.kind, volume.metadata.name, volume.metadata.namespace, HOST_LABEL,
                                             host)
        return False

    async def act(self, volume: Volume, status: VolumeStatus) -> None:
        if status.host and volume.metadata.labels.get(HOST_LABEL) != status.host:
            await self.runtime.api.set_label(self.kind, volume.metadata.name, volume.metadata.namespace, HOST_LABEL,
                                             status.host)
