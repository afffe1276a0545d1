"""The Linux bridge network driver: bridges are netlink links of kind ``bridge`` in the agent's
network namespace (the agent runs with the host network)."""

from __future__ import annotations

import asyncio
import errno

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import NetworkError


class LinuxBridgeDriver:
    def _bridge_exists(self, name: str) -> bool:
        try:
            # A socket per query: a few queries per check interval, and nothing is held open.
            with IPRoute() as ipr:
                indexes = ipr.link_lookup(ifname=name)
                if not indexes:
                    return False
                links = ipr.get_links(indexes[0])
        except (NetlinkError, OSError) as error:
            if isinstance(error, NetlinkError) and error.code == errno.ENODEV:
                return False  # removed between the lookup and the query
            raise NetworkError(f"netlink query for {name!r} failed: {error}") from None
        # A label naming some other kind of interface (a NIC, a veth) is not a usable bridge.
        return bool(links) and links[0].get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") == "bridge"

    async def bridge_exists(self, name: str) -> bool:
        return await asyncio.to_thread(self._bridge_exists, name)

    async def close(self) -> None:
        return None
