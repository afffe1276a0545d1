"""VirtualMachineMigration reconciler: live migration as a level-based reconcile (see the kind's module for the
phases, :mod:`hostagent.migrations` for the agents' part, :mod:`controllers.migration` for the pure parts).

Writes go in an order that keeps one truth across controller crashes: the target reservation is recorded in the
guest's ``status.migration`` before the migration names a target for an agent; the guest is marked as handed over
(``migrating``) before the source's agent is told to migrate; on success the volumes are moved before the guest's
placement and launch flip to the target in one status write (the source agent never sees a launch for its host
without the hand-over mark, so it never starts the guest again); on failure the mark goes and the guest, still on
the source, carries on. The capacity ledger is the VirtualMachine reconciler's: the target is held under
``<vm>@migration`` until the flip, when the guest's own reservation moves there and the source's is released.
"""

from __future__ import annotations

import typing as t

from controllers import kinds, migration, planner
from controllers.api.v1alpha1.common import FINALIZER
from controllers.api.v1alpha1.host import HOST_LABEL, HostState
from controllers.api.v1alpha1.storagepool import PoolScope
from controllers.api.v1alpha1.virtualmachine import MigrationState, Placement, VirtualMachine
from controllers.api.v1alpha1.virtualmachinemigration import (
    ACTIVE_PHASES,
    MigrationPhase,
    MigrationPlan,
    VirtualMachineMigration,
    VirtualMachineMigrationStatus,
)
from controllers.api.v1alpha1.zone import AllocationAlgorithm
from controllers.conditions import READY, Check, merge
from controllers.reconcilers.base import InventoryReconciler
from controllers.runtime import Result, deleting, status_patch, utcnow


def _vm_key(vm: VirtualMachine) -> str:
    return f"{vm.metadata.namespace}/{vm.metadata.name}"


class VirtualMachineMigrationReconciler(InventoryReconciler):
    kind = kinds.VIRTUALMACHINEMIGRATIONS
    agent_status_keys = ("node",)

    def setup(self) -> None:
        super().setup()
        self.index("virtualmachinemigrations", "vm", lambda m: [f"{m.metadata.namespace}/"
                                                                f"{m.spec.virtual_machine.name}"])

    def watch_map(self):
        def of_vm(vm):
            return [self.key(m.metadata.name, m.metadata.namespace)
                    for m in self.store.by("virtualmachinemigrations", "vm", _vm_key(vm))]
        def of_down_host(host):
            if host.status.state != HostState.DOWN:
                return []
            return [self.key(m.metadata.name, m.metadata.namespace) for m in self.store.list("virtualmachinemigrations")
                    if m.status.source_host == host.metadata.name and migration.active(m)]
        return {"virtualmachines": of_vm, "hosts": of_down_host}

    @property
    def vms(self) -> t.Any:
        return self.runtime.reconcilers["virtualmachines"]

    def derive(self, obj, ctx):  # the steps below write other objects in order; see reconcile
        return obj.status

    # -- reconcile -----------------------------------------------------------------------------

    async def reconcile(self, mig: VirtualMachineMigration) -> Result:
        api = self.runtime.api
        finalizers = list(mig.metadata.finalizers)
        if deleting(mig):
            if FINALIZER in finalizers and await self._finalize(mig):
                await api.set_finalizers(self.kind, mig.metadata.name, mig.metadata.namespace,
                                         mig.metadata.resource_version, [f for f in finalizers if f != FINALIZER])
                return Result()
            return Result(2.0)
        if FINALIZER not in finalizers:
            await api.set_finalizers(self.kind, mig.metadata.name, mig.metadata.namespace,
                                     mig.metadata.resource_version, [*finalizers, FINALIZER])
            return Result()
        status = mig.status.model_copy(deep=True)
        phase = MigrationPhase(status.phase) if status.phase else MigrationPhase.PENDING
        requeue: float | None = None
        vm = self.store.get("virtualmachines", mig.spec.virtual_machine.name, mig.metadata.namespace)
        if phase in (MigrationPhase.PENDING, MigrationPhase.SCHEDULING):
            await self._schedule(mig, vm, status)
        elif phase == MigrationPhase.PREPARING_TARGET:
            requeue = await self._preparing(mig, vm, status)
        elif phase == MigrationPhase.MIGRATING:
            await self._migrating(mig, vm, status)
        elif phase in (MigrationPhase.FAILED, MigrationPhase.SUCCEEDED):
            self._cleaning(mig, status)
        await self._write(mig, status)
        await self._label(mig, status)
        return Result(requeue)

    def _ready(self, mig: VirtualMachineMigration, status: VirtualMachineMigrationStatus) -> None:
        phase = status.phase
        if phase == MigrationPhase.SUCCEEDED:
            check = Check.passed("Succeeded", status.message)
        elif phase == MigrationPhase.FAILED:
            check = Check.failed(status.reason or "Failed", status.message)
        else:
            check = Check.failed(phase or "Pending", status.message)
        status.conditions = merge(mig.status.conditions, {READY: check}, mig.metadata.generation, utcnow())
        status.observed_generation = mig.metadata.generation

    async def _write(self, mig: VirtualMachineMigration, status: VirtualMachineMigrationStatus) -> None:
        self._ready(mig, status)
        await self.write_status(mig, status)

    def _acting_host(self, status: VirtualMachineMigrationStatus) -> str | None:
        plan = status.plan
        if plan is None:
            return None
        if status.phase == MigrationPhase.PREPARING_TARGET:
            return plan.target_host
        if status.phase == MigrationPhase.MIGRATING:
            return plan.target_host if status.verifying else plan.source_host
        if status.phase == MigrationPhase.FAILED and not status.cleaned_up:
            return plan.target_host
        if status.phase == MigrationPhase.SUCCEEDED and not status.cleaned_up:
            return plan.source_host
        return None

    async def _label(self, mig: VirtualMachineMigration, status: VirtualMachineMigrationStatus) -> None:
        host = self._acting_host(status)
        if mig.metadata.labels.get(HOST_LABEL) != host:
            await self.runtime.api.set_label(self.kind, mig.metadata.name, mig.metadata.namespace, HOST_LABEL, host)

    def _fail(self, status: VirtualMachineMigrationStatus, reason: str, message: str) -> None:
        status.phase = MigrationPhase.FAILED.value
        status.reason, status.message = reason, message
        status.completed_at = utcnow()
        # Nothing was made on the target unless it was asked to prepare disks.
        status.cleaned_up = status.plan is None or not status.plan.disks

    async def _vm_status(self, vm: VirtualMachine, patch: dict[str, t.Any]) -> None:
        await self.runtime.api.patch_status(kinds.VIRTUALMACHINES, vm.metadata.name, vm.metadata.namespace, patch)

    async def _release_target(self, mig: VirtualMachineMigration, vm: VirtualMachine | None) -> None:
        """The guest stays where it is: the target's reservation and the hand-over mark go."""
        if vm is None:
            return
        self.vms.ledger.release(migration.reservation_key(_vm_key(vm)))
        if vm.status.migration is not None and vm.status.migration.name == mig.metadata.name:
            await self._vm_status(vm, {"migration": None})

    # -- steps ---------------------------------------------------------------------------------

    async def _schedule(self, mig: VirtualMachineMigration, vm: VirtualMachine | None,
                        status: VirtualMachineMigrationStatus) -> None:
        name = f"{mig.metadata.namespace}/{mig.spec.virtual_machine.name}"
        status.started_at = status.started_at or utcnow()
        if vm is None:
            return self._fail(status, "VirtualMachineNotFound", f"VirtualMachine {name} does not exist")
        held = vm.status.migration
        if held is not None and held.name != mig.metadata.name:
            return self._fail(status, "MigrationInProgress", f"VirtualMachine {name} is being moved by migration "
                                                             f"{held.name}")
        placement = vm.status.placement
        source = placement.host if placement else None
        if held is None:
            node = vm.status.node
            if vm.spec.state.value != "Running" or vm.status.phase != "Running" or source is None or \
                    node is None or node.domain_state != "running" or node.host != source:
                return self._fail(status, "VirtualMachineNotRunning",
                                  f"VirtualMachine {name} is {vm.status.phase or 'not reconciled'}; only a Running "
                                  "guest can be live-migrated")
            if mig.spec.host == source:
                return self._fail(status, "SameHost", f"VirtualMachine {name} already runs on host {source}")
            decision, why = self._plan(mig, vm, source)
            if decision is None or not decision.ok:
                reason = decision.reason if decision else "NotMigratable"
                return self._fail(status, reason, why or (decision.message if decision else ""))
            launch = vm.status.launch
            self.vms.ledger.reserve(migration.reservation_key(_vm_key(vm)), decision.host, launch.cpu_number,
                                    launch.memory_mib, vm.metadata.namespace)
            held = MigrationState(name=mig.metadata.name, source_host=source, target_host=decision.host,
                                  target_pool=decision.pool if self._moving(vm) else None)
            # The durable reservation, before any agent hears of the target.
            await self._vm_status(vm, {"migration": held.model_dump(mode="json", by_alias=True, exclude_none=True)})
            status.message = decision.message
        status.source_host, status.target_host = held.source_host, held.target_host
        plan, why = self._resolve(vm, held)
        if plan is None:
            await self._release_target(mig, vm)
            return self._fail(status, "NotMigratable", why)
        status.plan = plan
        status.phase = MigrationPhase.PREPARING_TARGET.value
        status.message = f"preparing host {held.target_host}: network" + (
            f", {len(plan.disks)} disk(s) in pool {held.target_pool}" if plan.disks else "")

    def _pools(self) -> dict[str, t.Any]:
        return {p.metadata.name: p for p in self.store.list("storagepools")}

    def _moving(self, vm: VirtualMachine) -> list[t.Any]:
        root, data = self.vms._volumes(vm)
        return migration.local_volumes([v for v in [root, *data] if v is not None], self._pools())

    def _plan(self, mig: VirtualMachineMigration, vm: VirtualMachine,
              source: str) -> tuple[planner.Decision | None, str]:
        offering = self.store.get("serviceofferings", vm.spec.service_offering)
        zone = self.store.get("zones", vm.spec.zone)
        launch = vm.status.launch
        if offering is None or launch is None:
            return None, f"the guest's ServiceOffering {vm.spec.service_offering} or launch is missing"
        hosts, pools = self.vms._candidates(vm.spec.zone)
        source_candidate = next((h for h in hosts if h.name == source), None)
        root, data = self.vms._volumes(vm)
        volumes = [v for v in [root, *data] if v is not None]
        moving = self._moving(vm)
        pin = vm.spec.placement or Placement()
        if pin.host and mig.spec.host and pin.host != mig.spec.host:
            return None, f"the guest is pinned to host {pin.host} (spec.placement)"
        if moving:
            storage_type, disk_bytes = "local", sum(v.status.size_bytes or 0 for v in moving)
            tags = frozenset(offering.spec.storage_tags)
        else:
            storage_type, disk_bytes, tags = "shared", 0, frozenset()
            used = {v.status.storage_pool for v in volumes}
            pools = [p for p in pools if p.name in used]
        request = planner.Request(
            key=migration.reservation_key(_vm_key(vm)), owner=vm.metadata.namespace, zone=vm.spec.zone,
            cpu=launch.cpu_number, memory_mib=launch.memory_mib,
            hypervisor=source_candidate.hypervisor if source_candidate else "",
            host_tags=frozenset(offering.spec.host_tags), storage_type=storage_type, storage_tags=tags,
            disk_bytes=disk_bytes, affinity=self.vms._affinity(vm), pod=pin.pod,
            cluster=pin.cluster or (None if mig.spec.host else (vm.status.placement.cluster if vm.status.placement
                                                                 else None)),
            host=mig.spec.host or pin.host, avoid=frozenset({source}))
        algorithm = zone.spec.allocation_algorithm if zone else AllocationAlgorithm.FIRST_FIT
        return planner.plan(request, planner.Inventory(hosts, pools), self.vms.ledger, algorithm), ""

    def _resolve(self, vm: VirtualMachine, held: MigrationState) -> tuple[MigrationPlan | None, str]:
        target = self.store.get("hosts", held.target_host)
        disks = []
        moving = self._moving(vm)
        if moving:
            pool = self.store.get("storagepools", held.target_pool or "")
            if pool is None or pool.spec.scope != PoolScope.HOST:
                return None, f"target pool {held.target_pool} is not a local pool"
            disks = migration.migration_disks(moving, pool)
        address = target.status.node.private_ip if target is not None and target.status.node else None
        return MigrationPlan(source_host=held.source_host, target_host=held.target_host, target_address=address,
                             vm_uid=vm.metadata.uid, disks=disks), ""

    async def _preparing(self, mig: VirtualMachineMigration, vm: VirtualMachine | None,
                         status: VirtualMachineMigrationStatus) -> float | None:
        plan = status.plan
        report = status.node
        if vm is None or vm.metadata.uid != plan.vm_uid:
            self._fail(status, "VirtualMachineNotFound", "the guest went away")
            return None
        if report is not None and report.step == "PreparingTarget" and report.host == plan.target_host \
                and report.done:
            if not report.succeeded:
                await self._release_target(mig, vm)
                self._fail(status, "TargetPreparationFailed", report.message)
                return None
            held = vm.status.migration
            if held is None or held.name != mig.metadata.name:
                self._fail(status, "ReservationLost", "the guest's status no longer holds this migration")
                return None
            if not held.migrating:
                await self._vm_status(vm, {"migration": {"migrating": True}})
            status.phase = MigrationPhase.MIGRATING.value
            status.migration_started_at = utcnow()
            status.message = f"live-migrating from {plan.source_host} to {plan.target_host}" + (
                " with block copy of the disks" if plan.disks else " (memory only, shared storage)")
            return None
        elapsed = (utcnow() - (status.started_at or utcnow())).total_seconds()
        if elapsed > migration.PREPARE_TIMEOUT_SECONDS:
            await self._release_target(mig, vm)
            self._fail(status, "TargetNotResponding", f"the agent of host {plan.target_host} did not prepare "
                                                      f"within {migration.PREPARE_TIMEOUT_SECONDS:g}s")
            return None
        return migration.PREPARE_TIMEOUT_SECONDS - elapsed + 1.0

    async def _migrating(self, mig: VirtualMachineMigration, vm: VirtualMachine | None,
                         status: VirtualMachineMigrationStatus) -> None:
        plan = status.plan
        report = status.node
        if report is not None and report.step == "Migrating" and report.host == plan.source_host and report.done \
                and report.verify:
            status.verifying = True  # the target's agent says where the domain runs
            status.message = f"{report.message}; asking host {plan.target_host}"
            return
        if report is not None and report.step == "Verifying" and report.host == plan.target_host and report.done:
            report = report.model_copy(update={"message": report.message or "the domain runs on the target"})
        elif report is None or report.step != "Migrating" or report.host != plan.source_host or not report.done \
                or status.verifying:
            source = self.store.get("hosts", plan.source_host)
            if source is not None and source.status.state == HostState.DOWN:
                # Fenced (its HA guests are restarted elsewhere): nobody will report; a domain that did land on the
                # target is not placed there, so the target's sweep removes it.
                await self._release_target(mig, vm)
                self._fail(status, "SourceHostDown", f"host {plan.source_host} was found Down while migrating")
            return
        if not report.succeeded:
            await self._release_target(mig, vm)
            self._fail(status, "DomainLost" if report.step == "Verifying" else "MigrationFailed",
                       report.message + ("; the guest starts again on its source" if report.step == "Verifying"
                                         else ""))
            return
        if vm is not None and vm.metadata.uid == plan.vm_uid:
            await self._flip(vm, plan)
        status.phase = MigrationPhase.SUCCEEDED.value
        status.completed_at = utcnow()
        status.reason = None
        status.cleaned_up = not plan.disks  # the source copies of copied disks go next
        seconds = f" in {report.seconds:g}s" if report.seconds is not None else ""
        status.message = f"moved from {plan.source_host} to {plan.target_host}{seconds}"

    async def _flip(self, vm: VirtualMachine, plan: MigrationPlan) -> None:
        """The guest runs on the target now: volumes first, then placement, launch and the mark in one write."""
        api = self.runtime.api
        for disk in plan.disks:
            volume = self.store.get("volumes", disk.volume, vm.metadata.namespace)
            if volume is None or volume.status.path == disk.target_path:
                continue
            await api.patch_status(kinds.VOLUMES, disk.volume, vm.metadata.namespace,
                                   {"storagePool": disk.target_pool, "host": plan.target_host,
                                    "path": disk.target_path})
        target = self.store.get("hosts", plan.target_host)
        placement = (vm.status.placement or Placement()).model_copy(update={
            "host": plan.target_host, "cluster": target.spec.cluster if target else None,
            "pod": target.status.pod if target else None})
        if plan.disks:
            root = next((d for d in plan.disks if vm.status.launch and vm.status.launch.disks
                         and d.volume == vm.status.launch.disks[0].volume), None)
            if root is not None:
                placement = placement.model_copy(update={"storage_pool": root.target_pool})
        patch: dict[str, t.Any] = {
            "placement": placement.model_dump(mode="json", by_alias=True, exclude_none=True), "migration": None}
        if vm.status.launch is not None:
            patch["launch"] = migration.moved_launch(vm.status.launch, plan.target_host, plan.disks).model_dump(
                mode="json", by_alias=True, exclude_none=True)
        await self._vm_status(vm, patch)
        key = _vm_key(vm)
        launch = vm.status.launch
        if launch is not None:
            self.vms.ledger.reserve(key, plan.target_host, launch.cpu_number, launch.memory_mib,
                                    vm.metadata.namespace)
        self.vms.ledger.release(migration.reservation_key(key))

    def _cleaning(self, mig: VirtualMachineMigration, status: VirtualMachineMigrationStatus) -> None:
        report = status.node
        plan = status.plan
        if status.cleaned_up or plan is None:
            return
        step, host = ("CleaningUp", plan.target_host) if status.phase == MigrationPhase.FAILED else \
            ("CleaningSource", plan.source_host)
        if report is not None and report.step == step and report.host == host and report.done:
            status.cleaned_up = True
            if not report.succeeded and report.message:
                status.message = f"{status.message} (target: {report.message})"

    async def _finalize(self, mig: VirtualMachineMigration) -> bool:
        """Deleting a migration cancels it unless the hypervisor is moving the guest right now (that finishes
        first, then the outcome is recorded and the object goes)."""
        if mig.status.phase == MigrationPhase.MIGRATING:
            status = mig.status.model_copy(deep=True)
            vm = self.store.get("virtualmachines", mig.spec.virtual_machine.name, mig.metadata.namespace)
            await self._migrating(mig, vm, status)
            if status.phase == MigrationPhase.MIGRATING:
                return False
            await self.write_status(mig, status)
            return True
        if (mig.status.phase or MigrationPhase.PENDING) in ACTIVE_PHASES:
            vm = self.store.get("virtualmachines", mig.spec.virtual_machine.name, mig.metadata.namespace)
            await self._release_target(mig, vm)
        return True

    async def write_status(self, obj, status) -> None:
        patch = status_patch(obj, status, self.agent_status_keys)
        if patch is None:
            return
        await self.runtime.api.patch_status(self.kind, obj.metadata.name, obj.metadata.namespace, patch)
        if obj.status.phase != status.phase:
            type_ = "Warning" if status.phase == MigrationPhase.FAILED else "Normal"
            await self.runtime.api.record_event(self.kind, obj, type_, status.reason or status.phase or "Pending",
                                                f"{status.phase}: {status.message}")
