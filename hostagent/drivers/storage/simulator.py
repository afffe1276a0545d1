"""The simulator storage driver: every directory is reachable with the configured capacity, unless the
host's ``storage`` fault says otherwise."""

from __future__ import annotations

from controllers.api.v1alpha1.host import StorageReport

from ...faults import FaultInjector, InjectedFailure


class SimulatorStorageDriver:
    def __init__(self, faults: FaultInjector, *, capacity_bytes: int, call_timeout: float = 30.0) -> None:
        self.faults = faults
        self.capacity_bytes = capacity_bytes
        self.call_timeout = call_timeout

    async def check(self, path: str, *, create: bool, writable: bool = True) -> StorageReport:
        try:
            await self.faults.inject("storage", deadline=self.call_timeout)
        except InjectedFailure as error:
            return StorageReport(reachable=False, message=str(error))
        return StorageReport(reachable=True, capacity_bytes=self.capacity_bytes, used_bytes=0)

    async def close(self) -> None:
        return None
