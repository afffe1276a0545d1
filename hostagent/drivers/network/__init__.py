"""The network driver interface: what the agent asks of the host's virtual switch.

Implementations: :mod:`.linuxbridge` (netlink, through pyroute2), :mod:`.openvswitch` (Open vSwitch) and
:mod:`.simulator` (every bridge exists, nothing is wired; for simulated hosts without networking).

A guest network on a host is a :class:`~controllers.api.v1alpha1.network.Segment`, fully resolved by the
controller (bridge name, traffic label, VLAN/VNI, MTU). The driver makes the segment exist, plugs ports
(a guest's tap, a veth end of a router or network-namespace guest) into it, and removes what no port uses.
Every call is idempotent, so an agent restart re-applies everything without disturbing what works.

``netns``: simulated hosts are network namespaces; a driver given one does all its work inside it (None:
the agent's own network namespace, which on a real hypervisor is the host's).
"""

from __future__ import annotations

import typing as t

from controllers.api.v1alpha1.network import Segment


class NetworkError(Exception):
    """The host's network stack refused or could not be queried; the message is fit for a status field."""


@t.runtime_checkable
class NetworkDriver(t.Protocol):
    async def bridge_exists(self, name: str) -> bool:
        """Whether the bridge named ``name`` (a traffic label) exists on the host. Raises NetworkError."""
        ...

    async def ensure_segment(self, segment: Segment) -> None:
        """Make the segment usable on this host: its bridge, and for VXLAN/VLAN the tunnel or VLAN device on
        the traffic-label bridge. Raises NetworkError, with a clear reason when the kernel or switch cannot
        do the segment's isolation method (no 802.1Q support, no VXLAN)."""
        ...

    async def plug(self, segment: Segment, port: str) -> None:
        """Attach the existing interface ``port`` (in the host's network namespace) to the segment, with
        its VLAN tag where the switch tags ports. Idempotent."""
        ...

    async def unplug(self, segment: Segment, port: str) -> None:
        """Detach ``port`` from the segment; a port already gone is not an error."""
        ...

    async def release_segment(self, segment: Segment) -> None:
        """Remove the segment's bridge and tunnel/VLAN device if no port uses them any more."""
        ...

    async def close(self) -> None:
        ...
