"""The network driver interface: what the agent asks of the host's virtual switch.

Implementations: :mod:`.linuxbridge` (netlink, through pyroute2) and :mod:`.simulator` (every
bridge exists; for simulated hosts). The guest-network issues add plugging and VLAN/VXLAN devices.
"""

from __future__ import annotations

import typing as t


class NetworkError(Exception):
    """The host's network stack could not be queried."""


@t.runtime_checkable
class NetworkDriver(t.Protocol):
    async def bridge_exists(self, name: str) -> bool:
        """Whether the bridge named ``name`` (a traffic label) exists on the host. Raises NetworkError."""
        ...

    async def close(self) -> None:
        ...
