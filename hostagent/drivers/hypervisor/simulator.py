"""The simulator hypervisor driver: CloudStack's Simulator hypervisor as an agent driver.

A simulated host has the capacity it is configured with and no real guests; every operation first
asks the host's :class:`~hostagent.faults.FaultInjector` (operation names: ``facts`` now; the VM
issue adds ``start``, ``stop``, ``migrate``… and keeps its in-memory domains here).
"""

from __future__ import annotations

import dataclasses
import platform

from controllers.api.v1alpha1.common import HypervisorType

from ...faults import FaultInjector, InjectedFailure
from . import HostFacts, HypervisorError


@dataclasses.dataclass(frozen=True)
class SimulatedCapacity:
    """The configured size of each simulated host."""

    cpus: int = 16
    memory_mib: int = 65536
    cpu_speed_mhz: int = 2400
    cpu_model: str = "Simulated CPU"


class SimulatorDriver:
    """One simulated host's hypervisor."""

    hypervisor_type = HypervisorType.SIMULATOR

    def __init__(self, capacity: SimulatedCapacity, faults: FaultInjector, *, version: str,
                 call_timeout: float = 30.0) -> None:
        self.capacity = capacity
        self.faults = faults
        self.version = version
        self.call_timeout = call_timeout

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

    async def close(self) -> None:
        return None
