"""The simulator network driver: every traffic-label bridge exists and every segment operation succeeds without
touching anything (simulated hosts have no netlink)."""

from __future__ import annotations

from controllers.api.v1alpha1.network import Segment


class SimulatorNetworkDriver:
    async def bridge_exists(self, name: str) -> bool:
        return True

    async def ensure_segment(self, segment: Segment) -> None:
        return None

    async def plug(self, segment: Segment, port: str) -> None:
        return None

    async def unplug(self, segment: Segment, port: str) -> None:
        return None

    async def release_segment(self, segment: Segment) -> None:
        return None

    async def close(self) -> None:
        return None
