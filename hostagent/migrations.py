"""VirtualMachineMigrations: the agent's part of a live migration (the controller's is
:mod:`controllers.reconcilers.migration`).

The controller labels the migration ``cumulo.io/host=<host>`` of the agent that must act, and writes
everything it needs in ``status.plan``; the agent reports under ``status.node`` (one report per step):

* ``PreparingTarget`` (label: the target): the NICs' segments exist on the target and their security groups are
  in place, the Ceph secrets of RBD disks are defined, the guest's files (console log, config drive) are
  prepared, and the disks that move (local storage) are created empty, of the same virtual size, where the plan
  says; the report gives the files' paths.
* ``Migrating`` (label: the source): the hypervisor live-migrates the domain peer to peer (memory only on shared
  storage, with block copy of the moving disks on local storage); on failure the domain keeps running here and the
  report carries the hypervisor's reason. An agent restarted in the middle finds the state in its hypervisor: a
  job still running is waited for; a domain still here (no job) is migrated again; a domain gone from here is
  reported (``verify``) and the target's agent, labelled next, says whether it runs there (step ``Verifying``):
  a success if so; if not, the migration fails and the guest starts again on its source. Exactly one runs.
* ``Succeeded`` with disks copied (label: the source): once the Volumes name their new place, the source copies
  are deleted (only then).
* ``Failed`` with copies made (label: the target): the pre-created disks are deleted.

Each step is idempotent: a repeated reconcile finds the work done and reports the same.
"""

from __future__ import annotations

import logging
import time
import typing as t

import pydantic

from controllers.api.v1alpha1.virtualmachinemigration import MigrationPhase, VirtualMachineMigrationStatus

from . import vmspec
from .drivers.hypervisor import HypervisorError, MigrationTarget
from .drivers.network import NetworkError
from .drivers.storage import StorageError
from .kube import KubeError
from .reconciler import ObjectReconciler, namespaced_path
from .securitygroups import SecurityGroupError
from .vms import StartRefused

if t.TYPE_CHECKING:
    from .agent import HostWorker

log = logging.getLogger(__name__)


class MigrationReconciler(ObjectReconciler):
    kind = "VirtualMachineMigration"
    plural = "virtualmachinemigrations"
    status_key = "node"

    def __init__(self, agent: t.Any, **kwargs: t.Any) -> None:
        super().__init__(agent, **kwargs)

    async def reconcile(self, key: str, obj: dict[str, t.Any] | None) -> float | None:
        if obj is None:
            self.forget_states(key)
            self.queue.forget(key)
            return None
        try:
            status = VirtualMachineMigrationStatus.model_validate(obj.get("status") or {})
        except pydantic.ValidationError:
            return None
        plan, host = status.plan, self.bound_host(obj)
        worker = self.worker(host)
        if plan is None or worker is None:
            return None
        report = status.node
        if status.phase == MigrationPhase.PREPARING_TARGET and host == plan.target_host:
            if report is not None and report.step == "PreparingTarget" and report.done and report.host == host:
                return None
            value = await self._prepare(key, obj, status, worker)
        elif status.phase == MigrationPhase.MIGRATING and host == plan.target_host and status.verifying:
            if report is not None and report.step == "Verifying" and report.done and report.host == host:
                return None
            value = await self._verify(key, status, worker)
        elif status.phase == MigrationPhase.MIGRATING and host == plan.source_host:
            if report is not None and report.step == "Migrating" and report.done and report.host == host:
                return None
            value = await self._migrate(key, status, worker)
        elif status.phase == MigrationPhase.FAILED and host == plan.target_host and not status.cleaned_up:
            value = await self._clean_up(key, status, worker)
        elif status.phase == MigrationPhase.SUCCEEDED and host == plan.source_host and not status.cleaned_up:
            value = await self._clean_source(key, obj["metadata"].get("namespace", ""), status, worker)
        else:
            return None
        await self.report(key, obj, value)
        return None if value.get("done") else self.queue.backoff(key)

    # -- target --------------------------------------------------------------------------------

    async def _vm(self, namespace: str, name: str) -> dict[str, t.Any] | None:
        try:
            vm: dict[str, t.Any] = await self.agent.api.request(
                "GET", namespaced_path("virtualmachines", f"{namespace}/{name}"))
        except KubeError as error:
            if error.status == 404:
                return None
            raise
        return vm

    async def _prepare(self, key: str, obj: dict[str, t.Any], status: VirtualMachineMigrationStatus,
                       worker: HostWorker) -> dict[str, t.Any]:
        plan = status.plan
        assert plan is not None
        namespace = obj["metadata"].get("namespace", "")
        name = obj["spec"]["virtualMachine"]["name"]
        report: dict[str, t.Any] = {"host": worker.name, "step": "PreparingTarget"}
        vms = self.agent.vms
        try:
            vm = await self._vm(namespace, name)
            launch = vmspec.launch_of(vm) if vm is not None else None
            if vm is None or launch is None or str(vm["metadata"]["uid"]) != plan.vm_uid:
                return {**report, "done": True, "message": f"VirtualMachine {namespace}/{name} is gone or stopped"}
            launch = launch.model_copy(update={"host": worker.name})
            # The network first: the guest's NICs must find their segments the moment it lands.
            await vms._ensure_segments(worker, launch)
            await vms._security_groups(worker, plan.vm_uid, launch)
            # Network disks (RBD) name a libvirt secret that must exist on the target before the domain lands.
            await vms._ceph_secrets(launch.disks, worker.hypervisor)
            if worker.hypervisor.local_files:
                user_data, _note = await vms._user_data(vm, launch)
                domain_name = vmspec.domain_name(namespace, name, plan.vm_uid)
                console, drive = vms.files.prepare(vm, launch, domain_name, user_data)
                report.update(consoleLog=console, configDrive=drive)
            for disk in plan.disks:
                if await worker.storage.disk_info(disk.target_path) is None:
                    await worker.storage.create_disk(disk.target_path, disk.size_bytes)
                    log.info("migration target disk created", extra={"object": key, "volume": disk.volume,
                                                                     "path": disk.target_path})
        except (KubeError, NetworkError, SecurityGroupError, StorageError, StartRefused, HypervisorError,
                OSError) as error:
            self.transition(key, "prepare", str(error), logging.WARNING, "cannot prepare the migration target",
                            error=str(error))
            return {**report, "done": True, "message": f"preparing host {worker.name}: {error}"}
        self.transition(key, "prepare", "done", logging.INFO, "migration target prepared", host=worker.name)
        return {**report, "done": True, "succeeded": True}

    async def _clean_up(self, key: str, status: VirtualMachineMigrationStatus,
                        worker: HostWorker) -> dict[str, t.Any]:
        plan = status.plan
        assert plan is not None
        report: dict[str, t.Any] = {"host": worker.name, "step": "CleaningUp"}
        try:
            if await worker.hypervisor.domain(plan.vm_uid) is not None:
                # Never delete a disk under a guest: the domain landed here after all.
                return {**report, "done": True, "message": "the domain runs on the target; its disks are kept"}
            for disk in plan.disks:
                await worker.storage.delete_disk(disk.target_path)
        except (StorageError, HypervisorError) as error:
            return {**report, "message": f"cannot remove the target copies: {error}"}
        self.transition(key, "cleanup", "done", logging.INFO, "migration target copies removed",
                        disks=[d.target_path for d in plan.disks])
        return {**report, "done": True, "succeeded": True}

    # -- source --------------------------------------------------------------------------------

    async def _migrate(self, key: str, status: VirtualMachineMigrationStatus,
                       worker: HostWorker) -> dict[str, t.Any]:
        plan = status.plan
        assert plan is not None
        prepared = status.node
        report: dict[str, t.Any] = {"host": worker.name, "step": "Migrating"}
        pool_types = {d.target_pool for d in plan.disks}
        target = MigrationTarget(
            host=plan.target_host, address=plan.target_address,
            disks={d.source_path: d.target_path for d in plan.disks},
            console_log=prepared.console_log if prepared and prepared.step == "PreparingTarget" else None,
            config_drive=prepared.config_drive if prepared and prepared.step == "PreparingTarget" else None,
            shared_storage=not pool_types)
        hypervisor = worker.hypervisor
        started = time.monotonic()
        try:
            domain = await hypervisor.domain(plan.vm_uid)
            if domain is None or not domain.active:
                # Gone while this agent was down (a migration it started finished, or the guest died): only the
                # target's agent can tell which, from its own hypervisor.
                log.info("the domain left this host while the agent was down; asking the target",
                         extra={"object": key, "target": plan.target_host})
                return {**report, "done": True, "verify": True,
                        "message": "the domain left this host while its agent was down"}
            elif await hypervisor.migrating(plan.vm_uid):
                # Started before this agent restarted and still under way in the hypervisor: its outcome is
                # read once it ends (here: gone and running at the target, or still here).
                self.transition(key, "migrate", "running", logging.INFO, "a migration job is still running")
                return {**report, "message": "a migration started before the agent restarted is still running"}
            else:
                log.info("live migration starting", extra={"object": key, "target": plan.target_host,
                                                           "block_copy": bool(plan.disks)})
                await hypervisor.migrate(plan.vm_uid, target)
        except HypervisorError as error:
            message = str(error)
            try:
                here = await hypervisor.domain(plan.vm_uid)
            except HypervisorError:
                here = None
            log.warning("live migration failed", extra={"object": key, "error": message,
                                                        "still_here": here is not None and here.active})
            return {**report, "done": True, "message": message}
        seconds = round(time.monotonic() - started, 2)
        log.info("live migration done", extra={"object": key, "target": plan.target_host, "seconds": seconds})
        return {**report, "done": True, "succeeded": True, "seconds": seconds}

    async def _verify(self, key: str, status: VirtualMachineMigrationStatus, worker: HostWorker) -> dict[str, t.Any]:
        """Target: does the domain run here? (The source's agent restarted and found it gone.)"""
        plan = status.plan
        assert plan is not None
        report: dict[str, t.Any] = {"host": worker.name, "step": "Verifying"}
        try:
            domain = await worker.hypervisor.domain(plan.vm_uid)
        except HypervisorError as error:
            return {**report, "message": f"cannot look for the domain: {error}"}
        here = domain is not None and domain.active
        self.transition(key, "verify", str(here), logging.INFO, "migration outcome checked on the target",
                        running_here=here)
        return {**report, "done": True, "succeeded": here,
                "message": "" if here else "the domain does not run on the target"}

    async def _clean_source(self, key: str, namespace: str, status: VirtualMachineMigrationStatus,
                            worker: HostWorker) -> dict[str, t.Any]:
        """After the move is recorded (the Volumes name the target): the source copies of the moved disks go. Not
        before: until then this host's Volume reconciler would take a missing disk for one to create."""
        plan = status.plan
        assert plan is not None
        report: dict[str, t.Any] = {"host": worker.name, "step": "CleaningSource"}
        cached = self.agent.volumes.informer.cache
        for disk in plan.disks:
            volume = cached.get(f"{namespace}/{disk.volume}") or {}
            volume_status = volume.get("status") or {}
            if volume_status.get("host") == worker.name and volume_status.get("path") == disk.source_path:
                return {**report, "message": f"waiting for Volume {disk.volume} to name its new place"}
        try:
            if (domain := await worker.hypervisor.domain(plan.vm_uid)) is not None and domain.active:
                return {**report, "done": True, "message": "the domain still runs here; its disks are kept"}
            for disk in plan.disks:
                await worker.storage.delete_disk(disk.source_path)
        except (StorageError, HypervisorError) as error:
            return {**report, "message": f"cannot remove the source copies: {error}"}
        self.transition(key, "source", "cleaned", logging.INFO, "migrated disks' source copies removed",
                        disks=[d.source_path for d in plan.disks])
        return {**report, "done": True, "succeeded": True}
