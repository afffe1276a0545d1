"""Volume reconciler: resolves where a disk lives and hands it to the agent of the host that manages it.

A data volume stays Allocated (no pool, no disk) until it is attached to a placed guest, then goes to a
pool that guest's host reaches; a root volume gets the pool the planner chose with its guest. The
controller writes the resolved target (pool, host, path, size, base image) into status and labels the
volume with the host; that host's agent creates, resizes and deletes the disk and reports in
``status.node``. On an RBD pool the path is an image name (``volume-<uid>``), the base image the pool's template
image snapshot (``template-<uid>@base``) and ``status.rbd`` carries the pool's Ceph access for the agent. A new
data volume a pool cannot take (capacity × overprovisioning factor − allocated, every pool type) is refused with
``InsufficientCapacity``; root volumes were checked by the planner with their guest.

One-shot operations, all while the guest using the volume is Stopped (else a condition says so and nothing
happens):

* ``spec.revert`` (snapshot + token): the controller hands ``status.revert`` (the image to rewrite the disk
  from: the snapshot's primary copy if kept, else its backup) to the agent; done once ``node.reverted`` says
  its id, so re-applying the same manifest does nothing (condition ``Reverted``);
* ``spec.storagePool`` naming another pool: storage migration, phase Migrating. ``status.migration`` asks the
  agent for a verified copy on the new pool (``Copying``); once ``node.migrated`` confirms it, the volume's
  pool, path and host switch to the copy (``CleaningUp``) and the agent removes the source; until the switch
  the source is the volume, so an interrupted copy loses nothing and is simply redone (condition ``Migrated``);
* ``spec.fromSnapshot``: the new disk is a copy of the snapshot's backup (``status.sourceImage``).

Snapshot policies (:mod:`controllers.snapshotpolicy`): when a policy's due time has passed (and at most half
a period ago: due times missed for longer, while the controller was down, are skipped as CloudStack does),
the controller creates that due time's Snapshot (named after it, labelled with the policy, so a retry makes
no second one), deletes the policy's oldest snapshots beyond ``maxSnapshots``, and requeues the volume at the
next due time. Condition ``SnapshotPolicy`` says when a schedule cannot be read.
"""

from __future__ import annotations

import datetime
import math
import typing as t

from controllers import inventory, kinds
from controllers import snapshotpolicy as policies
from controllers.api.v1alpha1 import Volume
from controllers.api.v1alpha1.common import API_VERSION
from controllers.api.v1alpha1.host import HOST_LABEL, HostState
from controllers.api.v1alpha1.snapshot import POLICY_LABEL
from controllers.api.v1alpha1.storagepool import PoolScope, PoolType, StoragePool
from controllers.api.v1alpha1.template import ImageFormat, TemplateState
from controllers.api.v1alpha1.volume import (
    BaseImage,
    MigrationTarget,
    RevertTarget,
    VolumePhase,
    VolumeStatus,
    VolumeType,
)
from controllers.conditions import Check, find, first_failure
from controllers.reconcilers.base import InventoryReconciler
from controllers.reconcilers.snapshot import backed_up
from controllers.runtime import Result

GIB = 1024**3


RBD_TEMPLATE_SNAPSHOT = "base"


def disk_path(pool: StoragePool, volume: Volume) -> str:
    """The disk's file in a directory pool; its image name (``volume-<uid>``) in an RBD pool."""
    if pool.spec.type == PoolType.RBD:
        return f"volume-{volume.metadata.uid}"
    return f"{pool.spec.path.rstrip('/')}/{volume.metadata.uid}.qcow2"


def vm_stopped(vm: t.Any) -> bool:
    """No guest, or one that is Stopped (or Destroyed) with no domain running."""
    if vm is None:
        return True
    node = vm.status.node
    return vm.status.phase in ("Stopped", "Destroyed") and vm.status.launch is None and \
        (node is None or node.domain_state in (None, "", "shutoff", "gone"))


def base_image_path(pool: StoragePool, template_uid: str, fmt: ImageFormat) -> str:
    """The pool's copy of a template: a file in a directory pool; ``template-<uid>@base`` (the protected
    snapshot root volumes are cloned from) in an RBD pool."""
    if pool.spec.type == PoolType.RBD:
        return f"template-{template_uid}@{RBD_TEMPLATE_SNAPSHOT}"
    return f"{pool.spec.path.rstrip('/')}/templates/{template_uid}.{'raw' if fmt == ImageFormat.RAW else 'qcow2'}"


def pool_free_bytes(pool: StoragePool) -> int:
    """What a pool can still take: capacity × overprovisioning factor − allocated (virtual sizes), the same
    for every pool type; 0 while no capacity is known."""
    return int((pool.status.capacity_bytes or 0) * pool.spec.overprovisioning_factor) - (pool.status.allocated_bytes or 0)


def insufficient(pool: StoragePool, wanted: int, free: int) -> str:
    factor = pool.spec.overprovisioning_factor
    if pool.status.capacity_bytes is None:
        return f"StoragePool {pool.metadata.name} has not reported its capacity yet"
    return (f"StoragePool {pool.metadata.name} cannot take {math.ceil(wanted / GIB)} GiB: "
            f"{max(free, 0) / GIB:.1f} GiB free of {pool.status.capacity_bytes / GIB:.1f} GiB "
            f"× overprovisioning {factor:g}, {(pool.status.allocated_bytes or 0) / GIB:.1f} GiB allocated")


class VolumeReconciler(InventoryReconciler):
    kind = kinds.VOLUMES
    agent_status_keys = ("node",)
    progress_reasons = frozenset({"Creating"})
    quiet_ready_phases = frozenset({VolumePhase.READY.value, VolumePhase.ATTACHED.value})

    def setup(self) -> None:
        super().setup()
        self.policy_clock = policies.ScaledClock()
        self.index("snapshots", ".spec.volume.name", lambda s: [f"{s.metadata.namespace}/{s.spec.volume.name}"])
        self.index("volumes", "vm", lambda v: [f"{v.metadata.namespace}/{v.spec.virtual_machine.name}"]
                   if v.spec.virtual_machine else [])
        self.index("volumes", "fromTemplate", lambda v: [
            f"{v.spec.from_template.namespace or v.metadata.namespace}/{v.spec.from_template.name}"]
            if v.spec.from_template else [])
        self.index("volumes", ".status.storagePool", lambda v: [v.status.storage_pool] if v.status.storage_pool else [])
        self.index("volumes", "snapshot", lambda v: [f"{v.metadata.namespace}/{name}" for name in (
            v.spec.from_snapshot.name if v.spec.from_snapshot else None,
            v.spec.revert.snapshot if v.spec.revert else None) if name])

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

        def of_snapshot(snapshot):
            return [self.key(v.metadata.name, v.metadata.namespace) for v in
                    self.store.by("volumes", "snapshot", f"{snapshot.metadata.namespace}/{snapshot.metadata.name}")]

        return {"virtualmachines": of_vm, "templates": from_template, "storagepools": on_pool,
                "snapshots": of_snapshot}

    # -- what the volume needs ------------------------------------------------------------------

    def _vm(self, volume: Volume):
        ref = volume.spec.virtual_machine
        return self.store.get("virtualmachines", ref.name, volume.metadata.namespace) if ref else None

    def _template(self, volume: Volume):
        ref = volume.spec.from_template
        return self.store.get("templates", ref.name, ref.namespace or volume.metadata.namespace) if ref else None

    def _snapshot(self, volume: Volume, name: str | None):
        return self.store.get("snapshots", name, volume.metadata.namespace) if name else None

    def _wanted_bytes(self, volume: Volume, template: t.Any, snapshot: t.Any = None) -> tuple[int | None, str]:
        if snapshot is not None and snapshot.status.size_bytes and not volume.spec.size_gib:
            return snapshot.status.size_bytes, ""
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

    def _pool(self, volume: Volume, vm: t.Any, current: str | None) -> tuple[StoragePool | None, str]:
        name = current or volume.spec.storage_pool
        if name:
            pool = self.store.get("storagepools", name)
            return pool, "" if pool else f"StoragePool {name} does not exist"
        placement = vm.status.placement if vm is not None else None
        if volume.spec.type == VolumeType.ROOT:
            # The planner chose the root disk's pool with the guest (the offering's local or shared storage); the
            # guest's controller writes it into spec.storagePool, and until then it is read from the placement.
            # Choosing here instead would take a shared pool for a local offering.
            if placement is not None and placement.storage_pool:
                pool = self.store.get("storagepools", placement.storage_pool)
                return pool, "" if pool else f"StoragePool {placement.storage_pool} does not exist"
            return None, "a root volume gets the pool the planner chooses for its guest"
        if placement is None or placement.host is None:
            return None, "a data volume gets its pool when it is attached to a placed guest"
        return self._choose_pool(volume, placement.host)

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
        return max(candidates, key=lambda p: (pool_free_bytes(p), p.metadata.name)), ""

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

    def planned_target(self, volume: Volume) -> VolumeStatus | None:
        """The target :meth:`derive` will record for a volume not handed over yet (pool, path, format, size,
        Ceph access; None while it cannot be known), so a guest's launch can carry its root disk at once."""
        vm = self._vm(volume)
        pool, _why = self._pool(volume, vm, volume.status.storage_pool)
        wanted, _why = self._wanted_bytes(volume, self._template(volume))
        if pool is None or wanted is None or volume.spec.from_snapshot:
            return None
        rbd = pool.spec.type == PoolType.RBD
        return VolumeStatus(storage_pool=pool.metadata.name, path=disk_path(pool, volume),
                            format="raw" if rbd else "qcow2", size_bytes=wanted, rbd=pool.spec.rbd if rbd else None)

    # -- reconcile ------------------------------------------------------------------------------

    def derive(self, volume: Volume, ctx: inventory.Context) -> VolumeStatus:
        vm = self._vm(volume)
        template = self._template(volume)
        previous = volume.status
        node = volume.status.node
        status = VolumeStatus(observed_generation=volume.metadata.generation, conditions=previous.conditions,
                              node=previous.node, attached_to=previous.attached_to, device_id=previous.device_id)
        migration, migrated = self._migration(volume, vm, ctx)
        current_pool, current_path = previous.storage_pool, previous.path
        if migration is not None and migration.state == "CleaningUp":
            current_pool, current_path = migration.storage_pool, migration.path
        pool, why = self._pool(volume, vm, current_pool)
        source = self._snapshot(volume, volume.spec.from_snapshot.name if volume.spec.from_snapshot else None)
        wanted, size_why = self._wanted_bytes(volume, template, source)
        checks: list[Check] = []
        if volume.spec.from_template and template is None:
            checks.append(Check.failed("TemplateNotFound", f"Template {volume.spec.from_template.name} does not exist"))
        if volume.spec.from_snapshot:
            status.source_image = previous.source_image
            if status.source_image is None and not backed_up(source):
                checks.append(Check.failed("SnapshotNotReady", f"Snapshot {volume.spec.from_snapshot.name} "
                                           + ("does not exist" if source is None else "is not BackedUp yet")))
            elif status.source_image is None:
                status.source_image = source.status.secondary.path
        if pool is None:
            checks.append(Check.failed("NoPool" if volume.spec.storage_pool or volume.status.storage_pool
                                       else "Allocated", why))
        elif not volume.status.storage_pool and volume.spec.type != VolumeType.ROOT and wanted is not None \
                and wanted > (free := pool_free_bytes(pool)):
            # A new data volume; a root volume's pool was checked (and reserved) by the planner with its guest.
            checks.append(Check.failed("InsufficientCapacity", insufficient(pool, wanted, free)))
            pool = None
        if wanted is None:
            checks.append(Check.failed("SizeUnknown", size_why))
        base = None
        if pool is not None and template is not None:
            base, base_why = self._base_image(pool, template)
            if base is None:
                checks.append(Check.failed("TemplateNotReady", base_why))
        if pool is not None:
            # The pool is fixed once recorded; the rest of the target follows from it.
            status.storage_pool = pool.metadata.name
            status.host = migration.host if migration is not None else self._host(pool, vm)
            status.path = current_path or disk_path(pool, volume)
            status.format = "raw" if pool.spec.type == PoolType.RBD else "qcow2"
            status.rbd = pool.spec.rbd if pool.spec.type == PoolType.RBD else None
            status.size_bytes = max(wanted or 0, previous.size_bytes or 0) or None
            if volume.spec.from_snapshot and status.source_image is None:
                status.size_bytes = None  # nothing to hand over before the source is known
            # A migrated or reverted disk is a standalone copy: it has no base image any more.
            flattened = migration is not None and migration.state == "CleaningUp" or \
                node is not None and node.exists and previous.path and previous.base_image is None
            status.base_image = None if flattened else base or previous.base_image
            if status.host is None:
                checks.append(Check.failed("NoHost", f"no Up host reaches pool {pool.metadata.name}"))
        status.migration = migration
        # What spec.storagePool asked for when the pool was chosen or last migrated to: only a new value is a
        # storage migration request (a live migration moves the disk without changing the spec).
        status.requested_pool = previous.requested_pool or volume.spec.storage_pool
        if migrated is not None and migrated.ok and previous.migration is not None or \
                volume.spec.storage_pool and volume.spec.storage_pool == status.storage_pool:
            status.requested_pool = volume.spec.storage_pool
        revert = self._revert(volume, vm, migration, status)
        if migration is not None:
            checks.append(Check.failed("Migrating", f"migrating to pool {migration.storage_pool}" if migration.state
                                       == "Copying" else f"removing the source on pool {migration.source_pool}"))
        if status.revert is not None:
            checks.append(Check.failed("Reverting", f"reverting to snapshot {status.revert.snapshot}"))
        if node is not None and node.message:
            checks.append(Check.failed("DiskError", node.message))
        elif not checks and (node is None or not node.exists or self._guest_starting(volume, vm, status)):
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
        elif ready.reason == "DiskError" and migration is None and status.revert is None:
            status.phase = VolumePhase.ERROR.value
        elif migration is not None:
            status.phase = VolumePhase.MIGRATING.value
        elif status.revert is not None:
            status.phase = VolumePhase.REVERTING.value
        else:
            status.phase = VolumePhase.CREATING.value if status.path else VolumePhase.ALLOCATED.value
        status.conditions = inventory.conditions(previous.conditions, volume.metadata.generation, ctx, ready,
                                                 Migrated=migrated, Reverted=revert,
                                                 SnapshotPolicy=self._policy_check(volume))
        return status

    @staticmethod
    def _guest_starting(volume: Volume, vm: t.Any, status: VolumeStatus) -> bool:
        """A root disk just created for a guest whose start is under way: it stays Creating until the domain runs
        (or the start fails), then goes to Attached in one status write rather than Ready and Attached in two.
        The guest's start does not wait for this status (the agent reads its own report)."""
        if volume.spec.type != VolumeType.ROOT or vm is None or vm.status.launch is None:
            return False
        ready = find(volume.status.conditions, "Ready")
        if ready is None or ready.reason != "Creating" or vm.status.launch.power_state.value != "Running":
            return False
        node = vm.status.node
        return vm.status.launch.host == status.host and \
            any(d.volume == volume.metadata.name for d in vm.status.launch.disks) and \
            (node is None or (node.domain_state != "running" and not node.message))

    # -- snapshot policies ------------------------------------------------------------------------

    @staticmethod
    def _schedules(volume: Volume) -> tuple[list[tuple[t.Any, policies.Schedule]], list[str]]:
        good, bad = [], []
        for policy in volume.spec.snapshot_policies:
            try:
                good.append((policy, policies.parse(policy.interval_type.value, policy.schedule, policy.timezone)))
            except policies.ScheduleError as error:
                bad.append(f"{policy.interval_type.value}: {error}")
        return good, bad

    def _policy_check(self, volume: Volume) -> Check | None:
        if not volume.spec.snapshot_policies:
            return None
        _good, bad = self._schedules(volume)
        if bad:
            return Check.failed("InvalidSchedule", "; ".join(bad))
        return Check.passed("Scheduled", ", ".join(p.interval_type.value for p in volume.spec.snapshot_policies))

    async def _run_policies(self, volume: Volume, status: VolumeStatus) -> None:
        schedules, _bad = self._schedules(volume)
        if not schedules:
            return
        ready = status.node is not None and status.node.exists and status.migration is None and status.revert is None
        now = self.policy_clock.now()
        key = f"{volume.metadata.namespace}/{volume.metadata.name}"
        mine = self.store.by("snapshots", ".spec.volume.name", key)
        for policy, schedule in schedules:
            interval = policy.interval_type.value
            made = [s for s in mine if s.metadata.labels.get(POLICY_LABEL) == interval
                    and s.metadata.deletion_timestamp is None]
            due = policies.previous_due(schedule, now)
            name = policies.snapshot_name(volume.metadata.name, interval, due)
            created = volume.metadata.creation_timestamp
            fresh = 0
            if ready and now - due <= policies.period(schedule) / 2 and (created is None or due >= created) \
                    and not any(s.metadata.name == name for s in mine):
                await self.runtime.api.create(kinds.SNAPSHOTS, {
                    "apiVersion": API_VERSION, "kind": "Snapshot",
                    "metadata": {"name": name, "namespace": volume.metadata.namespace,
                                 "labels": {POLICY_LABEL: interval}},
                    "spec": {"volume": {"name": volume.metadata.name},
                             "displayText": f"{interval} snapshot policy of {volume.metadata.name}"}})
                fresh = 1  # in the store with the next watch event; it counts already
            epoch = datetime.datetime.min.replace(tzinfo=datetime.timezone.utc)
            for old in policies.to_delete([(s.metadata.name, s.metadata.creation_timestamp or epoch) for s in made],
                                          policy.max_snapshots - fresh):
                await self.runtime.api.delete(kinds.SNAPSHOTS, old, volume.metadata.namespace)

    def requeue(self, volume: Volume) -> Result:
        schedules, _bad = self._schedules(volume)
        if not schedules or volume.metadata.deletion_timestamp is not None:
            return Result()
        now = self.policy_clock.now()
        soonest = min(policies.next_due(schedule, now) for _policy, schedule in schedules)
        return Result(self.policy_clock.real_seconds(soonest) + 0.5)

    def _migration(self, volume: Volume, vm: t.Any, ctx: inventory.Context) -> tuple[MigrationTarget | None,
                                                                                     Check | None]:
        """The migration in progress or to begin, and the ``Migrated`` condition (None: never asked for)."""
        previous, node = volume.status.migration, volume.status.node
        if previous is not None:
            if previous.state == "Copying" and node is not None and node.migrated == previous.path:
                previous = previous.model_copy(update={"state": "CleaningUp"})
            if previous.state == "CleaningUp" and node is not None and node.source_removed == previous.source_path:
                return None, Check.passed("Migrated", f"moved from pool {previous.source_pool} to "
                                                      f"{previous.storage_pool}")
            return previous, Check.failed("Migrating", f"moving to pool {previous.storage_pool}")
        wanted, current = volume.spec.storage_pool, volume.status.storage_pool
        old = find(volume.status.conditions, "Migrated")
        asked = volume.status.requested_pool or wanted
        if not wanted or not current or wanted == current or wanted == asked or ctx.deleting:
            # A finished migration's condition stays as a record; nothing asked, nothing shown.
            return None, Check.passed(old.reason, old.message) if old is not None and old.status.value == "True" \
                else None
        if not volume.status.path or node is None or not node.exists:
            return None, Check.failed("DiskNotReady", "the disk does not exist yet")
        if not vm_stopped(vm):
            return None, Check.failed("VirtualMachineNotStopped", f"stop VirtualMachine {vm.metadata.name} first: a "
                                      "volume moves between pools only while its guest is Stopped")
        if volume.status.revert is not None:
            return None, Check.failed("VolumeBusy", "a revert is in progress")
        source = self.store.get("storagepools", current)
        target = self.store.get("storagepools", wanted)
        if target is None:
            return None, Check.failed("PoolNotFound", f"StoragePool {wanted} does not exist")
        if target.spec.type == PoolType.RBD and source is not None and source.spec.type == PoolType.RBD:
            return None, Check.failed("PoolTypeNotSupported", "migrating between two RBD pools is not supported yet "
                                      "(to or from a directory pool it is)")
        if target.spec.zone != volume.spec.zone:
            return None, Check.failed("PoolInOtherZone", f"StoragePool {wanted} is in zone {target.spec.zone}")
        host = volume.status.host
        access = target.status.host_access.get(host or "")
        if target.spec.scope == PoolScope.HOST and target.spec.host != host or access is None or not access.reachable:
            return None, Check.failed("PoolNotReachable", f"host {host}, which holds the disk, does not reach "
                                      f"StoragePool {wanted}")
        return MigrationTarget(storage_pool=wanted, path=disk_path(target, volume), host=host,
                               source_pool=current, source_path=volume.status.path, state="Copying",
                               rbd=target.spec.rbd if target.spec.type == PoolType.RBD else None,
                               source_rbd=source.spec.rbd if source is not None and source.spec.type == PoolType.RBD
                               else None), \
            Check.failed("Migrating", f"moving to pool {wanted}")

    def _revert(self, volume: Volume, vm: t.Any, migration: t.Any, status: VolumeStatus) -> Check | None:
        """Set ``status.revert`` when a revert is to be done; the ``Reverted`` condition."""
        request, node, previous = volume.spec.revert, volume.status.node, volume.status.revert
        if previous is not None and (node is None or node.reverted != previous.id):
            status.revert = previous  # the agent may be writing the disk: it finishes first
            return Check.failed("Reverting", f"reverting to snapshot {previous.snapshot}")
        if request is None:
            return None
        snapshot = self._snapshot(volume, request.snapshot)
        if snapshot is None:
            return Check.failed("SnapshotNotFound", f"Snapshot {request.snapshot} does not exist")
        revert_id = f"{snapshot.metadata.uid}/{request.token}"
        if node is not None and node.reverted == revert_id:
            return Check.passed("Reverted", f"reverted to snapshot {request.snapshot}")
        if snapshot.spec.volume.name != volume.metadata.name:
            return Check.failed("SnapshotOfAnotherVolume", f"Snapshot {request.snapshot} is of volume "
                                f"{snapshot.spec.volume.name}")
        if not backed_up(snapshot):
            return Check.failed("SnapshotNotReady", f"Snapshot {request.snapshot} is not BackedUp yet")
        if not vm_stopped(vm):
            return Check.failed("VirtualMachineNotStopped", f"stop VirtualMachine {vm.metadata.name} first: a volume "
                                "is reverted only while its guest is Stopped")
        if migration is not None or node is None or not node.exists:
            return Check.failed("VolumeBusy", "the disk is being created or migrated")
        report = snapshot.status.node
        primary = snapshot.status.primary
        kept = primary is not None and report is not None and report.taken and not report.primary_removed \
            and snapshot.status.host == volume.status.host
        status.revert = RevertTarget(id=revert_id, snapshot=request.snapshot,
                                     source=primary.path if kept else snapshot.status.secondary.path)
        return Check.failed("Reverting", f"reverting to snapshot {request.snapshot}")

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
        await self._run_policies(volume, status)
        if status.host and volume.metadata.labels.get(HOST_LABEL) != status.host:
            await self.runtime.api.set_label(self.kind, volume.metadata.name, volume.metadata.namespace, HOST_LABEL,
                                             status.host)
