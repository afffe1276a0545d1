"""The simulator network driver: every traffic-label bridge exists (simulated hosts have no netlink)."""

from __future__ import annotations


class SimulatorNetworkDriver:
    async def bridge_exists(self, name: str) -> bool:
        return True

    async def close(self) -> None:
        return None
