"""The simulator hypervisor driver: CloudStack's Simulator hypervisor as an agent driver.

A simulated host has the capacity it is configured with and in-memory domains (no guests, no files). Every
operation first asks the host's :class:`~hostagent.faults.FaultInjector`. Operation names (for
``--fault op=JSON`` and the ``cumulo.io/simulator-faults`` Host annotation):

* ``facts``: host facts (every check interval)
* ``start``: starting a domain (after ``start_seconds`` of simulated boot)
* ``stop``: an ACPI shutdown request (the domain goes ``stop_seconds`` later) and a destroy
* ``attach``: hot-plugging and unplugging a disk
* ``resize``: growing a disk of a running domain (and, in the simulator storage driver, of a stopped one)
* ``migrate``: a live migration (instant after ``migrate_seconds``); the domain moves to the target host's
  simulator, which must run in the same agent process (:data:`PEERS`, filled as the hosts' drivers are made)

The storage simulator adds ``download`` (template downloads) and ``create-volume``.

With a ``state_file`` (``cumulo-agent --sim-persist``) the host's domains and disks are kept in a JSON file,
rewritten atomically on every change and read back on start: like real guests and disks, they outlive a crash of
the agent, so a restarted agent has domains to adopt (the fault-injection harness, benchmarks/chaos.py,
relies on it), and the file shows from outside which domains run on which host.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import platform
import typing as t

from controllers.api.v1alpha1.common import HypervisorType

from ...faults import FaultInjector, InjectedFailure
from . import (DiskDevice, Domain, DomainDescription, DomainOwner, DomainState, HostFacts, HypervisorError,
               MigrationTarget, NetworkSource)


@dataclasses.dataclass(frozen=True)
class SimulatedCapacity:
    """The configured size of each simulated host."""

    cpus: int = 16
    memory_mib: int = 65536
    cpu_speed_mhz: int = 2400
    cpu_model: str = "Simulated CPU"


PEERS: dict[str, "SimulatorDriver"] = {}
"""The simulated hosts of this process by host name: where a migration finds its target."""


def _disk(raw: dict[str, t.Any]) -> DiskDevice:
    network = raw.get("network")
    if network is not None:
        raw = {**raw, "network": NetworkSource(**{**network, "hosts": tuple(network.get("hosts") or ())})}
    return DiskDevice(**raw)


class SimulatorDriver:
    """One simulated host's hypervisor."""

    hypervisor_type = HypervisorType.SIMULATOR
    local_files = False

    def __init__(self, capacity: SimulatedCapacity, faults: FaultInjector, *, version: str,
                 call_timeout: float = 30.0, start_seconds: float = 0.0, stop_seconds: float = 0.0,
                 disk_sizes: dict[str, int] | None = None, host: str | None = None,
                 migrate_seconds: float = 0.0, state_file: str | None = None) -> None:
        self.capacity = capacity
        self.migrate_seconds = migrate_seconds
        if host is not None:
            PEERS[host] = self
        self.faults = faults
        self.version = version
        self.call_timeout = call_timeout
        self.start_seconds = start_seconds
        self.stop_seconds = stop_seconds
        self._domains: dict[str, Domain] = {}
        # Virtual sizes of the host's simulated disks, shared with its simulator storage driver, so a live
        # resize shows in the volume's report.
        self.disk_sizes = disk_sizes if disk_sizes is not None else {}
        self._stopping: dict[str, asyncio.TimerHandle] = {}
        self._next_id = 1
        self.secrets: dict[str, tuple[str, bytes]] = {}  # libvirt-like secrets: uuid -> (usage, value)
        self.state_file = state_file
        if state_file is not None:
            self._load(state_file)

    # -- persistence (--sim-persist) -----------------------------------------------------------------

    def _load(self, path: str) -> None:
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return
        for raw in data.get("domains", []):
            if raw["state"] == DomainState.STOPPING:
                continue  # its shutdown finished while nobody watched
            owner = DomainOwner(**raw["owner"]) if raw.get("owner") else None
            domain = Domain(uuid=raw["uuid"], name=raw["name"], state=raw["state"], owner=owner,
                            disks=tuple(_disk(disk) for disk in raw.get("disks", [])),
                            console_log=raw.get("console_log"), id=raw.get("id"))
            self._domains[domain.uuid] = domain
        self.disk_sizes.update(data.get("disks", {}))
        self._next_id = max([self._next_id, *(d.id + 1 for d in self._domains.values() if d.id)])

    def save(self) -> None:
        """Write the host's domains and disks (no-op without a state file); a reader sees the old or new file."""
        if self.state_file is None:
            return
        data = {"domains": [dataclasses.asdict(d) for d in self._domains.values()], "disks": self.disk_sizes}
        temporary = f"{self.state_file}.tmp"
        os.makedirs(os.path.dirname(self.state_file), exist_ok=True)
        with open(temporary, "w") as f:
            json.dump(data, f)
        os.replace(temporary, self.state_file)

    async def _operation(self, operation: str) -> None:
        try:
            await self.faults.inject(operation, deadline=self.call_timeout)
        except InjectedFailure as error:
            raise HypervisorError(str(error)) from None

    async def host_facts(self) -> HostFacts:
        await self._operation("facts")
        return HostFacts(
            hypervisor_type=HypervisorType.SIMULATOR,
            hypervisor_version=self.version,
            cpu_model=self.capacity.cpu_model,
            cpu_sockets=1,
            cpu_cores=self.capacity.cpus,
            cpu_speed_mhz=self.capacity.cpu_speed_mhz,
            memory_mib=self.capacity.memory_mib,
            architecture=platform.machine(),
        )

    # -- domains -----------------------------------------------------------------------------------

    async def start(self, description: DomainDescription) -> Domain:
        existing = self._domains.get(description.uuid)
        if existing is not None:
            return existing
        if any(domain.name == description.name for domain in self._domains.values()):
            raise HypervisorError(f"a domain named {description.name} already exists")
        await self._operation("start")
        if self.start_seconds:
            await asyncio.sleep(self.start_seconds)
        existing = self._domains.get(description.uuid)
        if existing is not None:  # started meanwhile by a concurrent call
            return existing
        domain = Domain(uuid=description.uuid, name=description.name, state=DomainState.RUNNING,
                        owner=description.owner, disks=description.disks, console_log=description.console_log,
                        id=self._next_id)
        self._next_id += 1
        self._domains[description.uuid] = domain
        self.save()
        return domain

    async def shutdown(self, uuid: str) -> None:
        if uuid not in self._domains:
            return
        await self._operation("stop")
        if uuid in self._stopping:
            return
        if not self.stop_seconds:
            self._remove(uuid)
            return
        self._domains[uuid] = dataclasses.replace(self._domains[uuid], state=DomainState.STOPPING)
        self.save()
        self._stopping[uuid] = asyncio.get_running_loop().call_later(self.stop_seconds, self._remove, uuid)

    def _remove(self, uuid: str) -> None:
        self._domains.pop(uuid, None)
        handle = self._stopping.pop(uuid, None)
        if handle is not None:
            handle.cancel()
        self.save()

    async def destroy(self, uuid: str) -> None:
        if uuid not in self._domains:
            return
        await self._operation("stop")
        self._remove(uuid)

    async def domains(self) -> list[Domain]:
        return list(self._domains.values())

    async def domain(self, uuid: str) -> Domain | None:
        return self._domains.get(uuid)

    def _running(self, uuid: str) -> Domain:
        domain = self._domains.get(uuid)
        if domain is None:
            raise HypervisorError(f"domain {uuid} is not running")
        return domain

    async def attach_disk(self, uuid: str, disk: DiskDevice) -> None:
        self._running(uuid)
        await self._operation("attach")
        domain = self._running(uuid)
        if any(d.target == disk.target or d.path == disk.path for d in domain.disks):
            raise HypervisorError(f"target {disk.target} or {disk.path} is already in use")
        self._domains[uuid] = dataclasses.replace(domain, disks=(*domain.disks, disk))
        self.save()

    async def detach_disk(self, uuid: str, disk: DiskDevice) -> None:
        if uuid not in self._domains:
            return
        await self._operation("attach")
        domain = self._domains.get(uuid)
        if domain is not None:
            self._domains[uuid] = dataclasses.replace(
                domain, disks=tuple(d for d in domain.disks if d.target != disk.target))
            self.save()

    async def block_resize(self, uuid: str, path: str, size_bytes: int) -> None:
        domain = self._running(uuid)
        if not any(d.path == path for d in domain.disks):
            raise HypervisorError(f"domain {uuid} has no disk {path}")
        await self._operation("resize")
        if path in self.disk_sizes:
            self.disk_sizes[path] = max(self.disk_sizes[path], size_bytes)
            self.save()

    async def migrate(self, uuid: str, target: MigrationTarget) -> None:
        domain = self._running(uuid)
        peer = PEERS.get(target.host)
        if peer is None or peer is self:
            raise HypervisorError(f"unable to connect to the simulated host {target.host}: not in this agent process")
        await self._operation("migrate")
        if self.migrate_seconds:
            await asyncio.sleep(self.migrate_seconds)
        domain = self._running(uuid)
        owner = dataclasses.replace(domain.owner, host=target.host) if domain.owner else None
        disks = tuple(dataclasses.replace(d, path=target.disks.get(d.path, d.path)) for d in domain.disks)
        for source, copy in target.disks.items():
            if source in self.disk_sizes:
                peer.disk_sizes[copy] = self.disk_sizes[source]
        peer._domains[uuid] = dataclasses.replace(domain, owner=owner, disks=disks, id=peer._next_id)
        peer._next_id += 1
        peer.save()
        self._remove(uuid)

    async def migrating(self, uuid: str) -> bool:
        return False  # the simulator's migrations live in the agent process: they die with it

    async def backup_disk(self, uuid: str, path: str, target: str) -> None:
        domain = self._running(uuid)
        if not any(d.path == path for d in domain.disks):
            raise HypervisorError(f"domain {uuid} has no disk {path}")
        await self._operation("snapshot")
        if path in self.disk_sizes:
            self.disk_sizes[target] = self.disk_sizes[path]

    async def define_secret(self, uuid: str, usage: str, value: bytes) -> None:
        self.secrets[uuid] = (usage, value)

    async def close(self) -> None:
        for handle in self._stopping.values():
            handle.cancel()
        self._stopping.clear()
