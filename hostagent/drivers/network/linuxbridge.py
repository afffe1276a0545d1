"""The Linux bridge network driver: guest segments as kernel bridges, VXLAN and 802.1Q devices, over netlink
(pyroute2), in the host's network namespace (``netns``; None: the agent's own).

A segment on a host, as CloudStack's KVM scripts (modifyvxlan.sh, modifyvlan.sh) lay it out:

* untagged: the traffic-label bridge itself (``cloudbr0``); ports plug straight into it. It belongs to the
  host's configuration and is never created or deleted here.
* VXLAN ``vxlan://<vni>``: device ``vxlan<vni>`` on the label bridge (the underlay address lives there), UDP
  port 4789, flood-and-learn through the multicast group ``239.<vni>>16&0xff>.<vni>>8&0xff>.<vni&0xff>``,
  enslaved to bridge ``brvx-<vni>``. Its MTU is the segment's; the underlay needs 50 bytes more.
* VLAN ``vlan://<id>``: device ``<label>.<id>`` on the label bridge, enslaved to ``brvlan-<id>``. Kernels
  without 802.1Q support (no 8021q module) refuse to make the device; that becomes a NetworkError saying so.

Every call is idempotent. :meth:`LinuxBridgeDriver.release_segment` removes a segment's bridge and device only
when no other port is left on the bridge, so guests sharing a segment keep it. Calls for one bridge are
serialised in the driver (two guests of a network starting at once must not race to make its bridge).

Planning (names, multicast group, checks) is pure (:func:`plan_segment`); the netlink work runs in threads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import typing as t

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from controllers.api.v1alpha1.network import Segment, parse_broadcast_uri

from . import NetworkError

IFNAMSIZ = 15
VXLAN_PORT = 4789
VXLAN_OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
NETNS_DIR = "/run/netns"


def vxlan_multicast_group(vni: int) -> str:
    """The multicast group of a VNI, as CloudStack's modifyvxlan.sh derives it."""
    return f"239.{(vni >> 16) & 0xFF}.{(vni >> 8) & 0xFF}.{vni & 0xFF}"


@dataclasses.dataclass(frozen=True)
class SegmentPlan:
    """What a segment is on a Linux bridge host."""

    bridge: str                 # where ports plug in
    label: str                  # the traffic-label bridge (underlay)
    kind: str | None = None     # None (untagged), "vxlan" or "vlan"
    device: str | None = None   # the tunnel / VLAN device enslaved to ``bridge``
    vnet: int | None = None     # VNI or VLAN ID
    group: str | None = None    # VXLAN multicast group
    mtu: int = 1500

    @property
    def owned(self) -> bool:
        """Whether the driver made (and may remove) the bridge: untagged segments use the label's."""
        return self.kind is not None


def plan_segment(segment: Segment) -> SegmentPlan:
    """The plan of ``segment``; NetworkError for a segment this driver cannot make."""
    if segment.vswitch != "linuxbridge":
        raise NetworkError(f"segment is for vswitch {segment.vswitch!r}, but this host runs the Linux bridge driver")
    try:
        isolation, vnet = parse_broadcast_uri(segment.broadcast_uri)
    except ValueError as error:
        raise NetworkError(str(error)) from None
    label = segment.traffic_label
    for name in (label, segment.bridge):
        if not name or len(name) > IFNAMSIZ:
            raise NetworkError(f"bridge name {name!r} is not a valid interface name (1 to {IFNAMSIZ} characters)")
    if isolation is None:
        if segment.bridge != label:
            raise NetworkError(f"an untagged segment plugs into its label bridge {label!r}, not {segment.bridge!r}")
        return SegmentPlan(bridge=label, label=label, mtu=segment.mtu)
    assert vnet is not None
    if segment.bridge == label:
        raise NetworkError(f"segment {segment.broadcast_uri} needs its own bridge, not the label bridge {label!r}")
    if isolation == "VXLAN":
        if not 1 <= vnet <= 0xFFFFFF:
            raise NetworkError(f"VNI {vnet} is out of range (1-16777215)")
        return SegmentPlan(bridge=segment.bridge, label=label, kind="vxlan", device=f"vxlan{vnet}", vnet=vnet,
                           group=vxlan_multicast_group(vnet), mtu=segment.mtu)
    if not 1 <= vnet <= 4094:
        raise NetworkError(f"VLAN {vnet} is out of range (1-4094)")
    device = f"{label}.{vnet}"
    if len(device) > IFNAMSIZ:
        raise NetworkError(f"VLAN device name {device!r} would exceed {IFNAMSIZ} characters; use a shorter "
                           "traffic label")
    return SegmentPlan(bridge=segment.bridge, label=label, kind="vlan", device=device, vnet=vnet, mtu=segment.mtu)


def _kind(link: t.Any) -> str | None:
    return link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")


def _data(link: t.Any, attr: str) -> t.Any:
    return link.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA", attr)


class LinuxBridgeDriver:
    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._locks: dict[str, asyncio.Lock] = {}

    # -- netlink plumbing (runs in a worker thread) -------------------------------------------

    def _ipr(self) -> IPRoute:
        if self.netns is None:
            return IPRoute()
        # pyroute2 would create a missing namespace; a host namespace that is gone is an error instead.
        if not os.path.exists(os.path.join(NETNS_DIR, self.netns)):
            raise NetworkError(f"host network namespace {self.netns!r} does not exist")
        return IPRoute(netns=self.netns, flags=0)

    def _call(self, what: str, function: t.Callable[[IPRoute], t.Any]) -> t.Any:
        try:
            with self._ipr() as ipr:
                return function(ipr)
        except NetworkError:
            raise
        except NetlinkError as error:
            raise NetworkError(f"{what}: {os.strerror(error.code) if error.code else error}") from None
        except OSError as error:
            raise NetworkError(f"{what}: {error}") from None

    async def _run(self, what: str, function: t.Callable[[IPRoute], t.Any], lock: str | None = None) -> t.Any:
        if lock is None:
            return await asyncio.to_thread(self._call, what, function)
        async with self._locks.setdefault(lock, asyncio.Lock()):
            return await asyncio.to_thread(self._call, what, function)

    @staticmethod
    def _link(ipr: IPRoute, name: str) -> t.Any | None:
        indexes = ipr.link_lookup(ifname=name)
        if not indexes:
            return None
        try:
            links = ipr.get_links(indexes[0])
        except NetlinkError as error:
            if error.code == errno.ENODEV:
                return None  # removed between the lookup and the query
            raise
        return links[0] if links else None

    def _bridge(self, ipr: IPRoute, name: str) -> t.Any | None:
        link = self._link(ipr, name)
        # A label naming some other kind of interface (a NIC, a veth) is not a usable bridge.
        return link if link is not None and _kind(link) == "bridge" else None

    # -- the NetworkDriver interface ----------------------------------------------------------

    async def bridge_exists(self, name: str) -> bool:
        return bool(await self._run(f"netlink query for {name!r} failed",
                                    lambda ipr: self._bridge(ipr, name) is not None))

    async def ensure_segment(self, segment: Segment) -> None:
        plan = plan_segment(segment)
        await self._run(f"cannot make segment {segment.broadcast_uri or plan.bridge}",
                        lambda ipr: self._ensure(ipr, plan), lock=plan.bridge)

    def _ensure(self, ipr: IPRoute, plan: SegmentPlan) -> None:
        label = self._bridge(ipr, plan.label)
        if label is None:
            raise NetworkError(f"traffic label bridge {plan.label!r} does not exist on this host")
        if plan.kind is None:
            return
        if plan.kind == "vxlan" and label.get("IFLA_MTU") < plan.mtu + VXLAN_OVERHEAD:
            raise NetworkError(f"VXLAN segment MTU {plan.mtu} needs {plan.label!r} to have an MTU of at least "
                               f"{plan.mtu + VXLAN_OVERHEAD}, not {label.get('IFLA_MTU')}")
        bridge = self._bridge(ipr, plan.bridge)
        if bridge is None:
            if self._link(ipr, plan.bridge) is not None:
                raise NetworkError(f"{plan.bridge!r} exists and is not a bridge")
            self._create(ipr, ifname=plan.bridge, kind="bridge", mtu=plan.mtu)
            bridge = self._bridge(ipr, plan.bridge)
            assert bridge is not None
        elif bridge.get("IFLA_MTU") != plan.mtu:
            ipr.link("set", index=bridge["index"], mtu=plan.mtu)
        device = self._link(ipr, plan.device) if plan.device else None
        if device is not None and not self._device_matches(device, plan, label["index"]):
            # A leftover with other parameters (a VNI reused on another label): replace it.
            ipr.link("del", index=device["index"])
            device = None
        if device is None:
            assert plan.device is not None
            if plan.kind == "vxlan":
                self._create(ipr, ifname=plan.device, kind="vxlan", vxlan_id=plan.vnet, vxlan_group=plan.group,
                             vxlan_link=label["index"], vxlan_port=VXLAN_PORT, vxlan_learning=1, vxlan_ttl=10,
                             mtu=plan.mtu)
            else:
                self._create_vlan(ipr, plan, label["index"])
            device = self._link(ipr, plan.device)
            assert device is not None
        ipr.link("set", index=device["index"], master=bridge["index"], mtu=plan.mtu, state="up")
        ipr.link("set", index=bridge["index"], state="up")

    @staticmethod
    def _device_matches(device: t.Any, plan: SegmentPlan, label_index: int) -> bool:
        if _kind(device) != plan.kind:
            return False
        if plan.kind == "vxlan":
            return (_data(device, "IFLA_VXLAN_ID") == plan.vnet and _data(device, "IFLA_VXLAN_LINK") == label_index
                    and _data(device, "IFLA_VXLAN_GROUP") == plan.group)
        return _data(device, "IFLA_VLAN_ID") == plan.vnet and device.get("IFLA_LINK") == label_index

    @staticmethod
    def _create(ipr: IPRoute, **spec: t.Any) -> None:
        try:
            ipr.link("add", **spec)
        except NetlinkError as error:
            if error.code != errno.EEXIST:  # made by someone else meanwhile: checked by the caller
                raise

    def _create_vlan(self, ipr: IPRoute, plan: SegmentPlan, label_index: int) -> None:
        try:
            self._create(ipr, ifname=plan.device, kind="vlan", link=label_index, vlan_id=plan.vnet, mtu=plan.mtu)
        except NetlinkError as error:
            if error.code in (errno.EOPNOTSUPP, errno.ENOENT, errno.EINVAL) and not self._vlan_capable():
                raise NetworkError(
                    f"VLAN isolation ({plan.vnet}) cannot work on this host: the kernel cannot make 802.1Q VLAN "
                    "devices (no 8021q module); use VXLAN isolation or the Open vSwitch backend") from None
            raise

    @staticmethod
    def _vlan_capable() -> bool:
        # /proc/net/vlan appears when the 8021q module is loaded (or built in).
        return os.path.isdir("/proc/net/vlan")

    async def plug(self, segment: Segment, port: str) -> None:
        plan = plan_segment(segment)
        await self._run(f"cannot plug {port!r} into {plan.bridge!r}", lambda ipr: self._plug(ipr, plan, port),
                        lock=plan.bridge)

    def _plug(self, ipr: IPRoute, plan: SegmentPlan, port: str) -> None:
        bridge = self._bridge(ipr, plan.bridge)
        if bridge is None:
            raise NetworkError(f"bridge {plan.bridge!r} does not exist (segment not ensured)")
        link = self._link(ipr, port)
        if link is None:
            raise NetworkError(f"port {port!r} does not exist")
        changes: dict[str, t.Any] = {}
        if link.get("IFLA_MASTER") != bridge["index"]:
            changes["master"] = bridge["index"]
        if link.get("IFLA_MTU") != plan.mtu:
            changes["mtu"] = plan.mtu
        ipr.link("set", index=link["index"], state="up", **changes)

    async def unplug(self, segment: Segment, port: str) -> None:
        plan = plan_segment(segment)
        await self._run(f"cannot unplug {port!r} from {plan.bridge!r}", lambda ipr: self._unplug(ipr, plan, port),
                        lock=plan.bridge)

    def _unplug(self, ipr: IPRoute, plan: SegmentPlan, port: str) -> None:
        link = self._link(ipr, port)
        bridge = self._bridge(ipr, plan.bridge)
        if link is None or bridge is None or link.get("IFLA_MASTER") != bridge["index"]:
            return
        try:
            ipr.link("set", index=link["index"], master=0)
        except NetlinkError as error:
            if error.code != errno.ENODEV:
                raise

    async def release_segment(self, segment: Segment) -> None:
        plan = plan_segment(segment)
        if not plan.owned:
            return  # the label bridge is the host's
        await self._run(f"cannot release segment {segment.broadcast_uri}", lambda ipr: self._release(ipr, plan),
                        lock=plan.bridge)

    def _release(self, ipr: IPRoute, plan: SegmentPlan) -> bool:
        """Remove the segment if only its own device is left on the bridge; whether it did."""
        bridge = self._bridge(ipr, plan.bridge)
        if bridge is not None:
            ports = [link.get("IFLA_IFNAME") for link in ipr.get_links() if link.get("IFLA_MASTER") == bridge["index"]]
            if any(name != plan.device for name in ports):
                return False
        device = self._link(ipr, plan.device) if plan.device else None
        for link in (device, bridge):
            if link is not None:
                try:
                    ipr.link("del", index=link["index"])
                except NetlinkError as error:
                    if error.code != errno.ENODEV:
                        raise
        return True

    async def ports(self, segment: Segment) -> list[str]:
        """Interfaces plugged into the segment's bridge (its own tunnel/VLAN device excluded)."""
        plan = plan_segment(segment)

        def query(ipr: IPRoute) -> list[str]:
            bridge = self._bridge(ipr, plan.bridge)
            if bridge is None:
                return []
            return sorted(link.get("IFLA_IFNAME") for link in ipr.get_links()
                          if link.get("IFLA_MASTER") == bridge["index"] and link.get("IFLA_IFNAME") != plan.device)

        return t.cast(list[str], await self._run(f"cannot list ports of {plan.bridge!r}", query))

    async def segments(self) -> list[Segment]:
        """The VXLAN/VLAN segments present on the host (bridges ``brvx-<vni>``/``brvlan-<id>`` holding their
        device), rebuilt from the kernel: what an agent that restarted may have to release."""

        def query(ipr: IPRoute) -> list[Segment]:
            links = {link["index"]: link for link in ipr.get_links()}
            found = []
            for link in links.values():
                master = links.get(link.get("IFLA_MASTER"))
                if master is None or _kind(master) != "bridge":
                    continue
                bridge, kind = master.get("IFLA_IFNAME"), _kind(link)
                if kind == "vxlan" and bridge == f"brvx-{_data(link, 'IFLA_VXLAN_ID')}":
                    label = links.get(_data(link, "IFLA_VXLAN_LINK"))
                    uri = f"vxlan://{_data(link, 'IFLA_VXLAN_ID')}"
                elif kind == "vlan" and bridge == f"brvlan-{_data(link, 'IFLA_VLAN_ID')}":
                    label = links.get(link.get("IFLA_LINK"))
                    uri = f"vlan://{_data(link, 'IFLA_VLAN_ID')}"
                else:
                    continue
                if label is not None:
                    found.append(Segment(traffic_label=label.get("IFLA_IFNAME"), broadcast_uri=uri, bridge=bridge,
                                         mtu=link.get("IFLA_MTU")))
            return found

        return t.cast(list[Segment], await self._run("cannot list segments", query))

    async def close(self) -> None:
        return None
