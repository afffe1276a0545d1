"""The Open vSwitch network driver: guest segments as VLAN tags on the traffic-label bridge (or a VXLAN bridge of
their own), through OVSDB.

The driver talks to the host's ``ovsdb-server`` directly with ovsdbapp (the OVSDB IDL that OpenStack's
agents use), not through ``ovs-vsctl``: one long-lived connection keeps a replica of the database, so reads
cost no process and writes are transactions. ovsdbapp is blocking (its IDL runs in a thread of its own);
every call runs in a worker thread (``asyncio.to_thread``). ovsdbapp keeps its connection in a class attribute
(one database per process); each driver uses a subclass of its own, so one process can drive several hosts'
switches (simulated hosts, tests). Its write transactions wait until
``ovs-vswitchd`` has applied them (``next_cfg``/``cur_cfg``, as ``ovs-vsctl`` does), so a plugged port is
really in the datapath when :meth:`OpenVSwitchDriver.plug` returns; a port ``ovs-vswitchd`` could not open
(``ofport`` -1) becomes a NetworkError with the switch's reason.

A segment on a host:

* untagged: ports plug into the traffic-label bridge (``cloudbr0``) with no tag.
* VLAN ``vlan://<id>``: ports plug into the traffic-label bridge itself as access ports with ``tag=<id>``; the
  host's uplink on that bridge is a trunk (no tag, no ``trunks`` list), so the tagged frames leave on the
  physical network. No per-segment bridge or device exists: :meth:`OpenVSwitchDriver.ensure_segment` only
  checks the label bridge, :meth:`OpenVSwitchDriver.release_segment` removes only records of this segment's
  ports whose interface has gone (a guest's tap that died with its QEMU). No 802.1Q kernel support is needed
  (the switch tags), which is why VLAN isolation works here on kernels without the 8021q module.
* VXLAN ``vxlan://<vni>``: an OVS bridge of the segment's own, ``brvx-<vni>`` (on the label bridge's datapath),
  whose uplink is a kernel VXLAN device ``vxlan<vni>`` on the label bridge's internal port (the underlay address),
  exactly as the Linux bridge backend makes it: UDP port 4789, flood-and-learn through the VNI's multicast group.
  Why not OVS's own VXLAN ports: they are point-to-point (``options:remote_ip``; OVS has no multicast
  flood-and-learn), so the driver would need the underlay addresses of every other host of the network, which a
  Segment does not carry. The kernel device needs none, and Open vSwitch and Linux bridge hosts share VXLAN
  segments on the wire. :meth:`OpenVSwitchDriver.release_segment` removes bridge and device once no other port
  is left on the bridge; :meth:`OpenVSwitchDriver.segments` finds them again after an agent restart.

Ports the driver plugs carry ``external_ids:cumulo-segment=<broadcast URI or "untagged">``, so what the agent
plugged is told apart from the host's own ports (the uplink, the bridge's internal port). Records of plugged ports
whose interface has gone (a guest's tap dies with its QEMU; OVSDB keeps the port) are dropped by the next plug or
release on the host.

Datapath. Production hosts run the OVS kernel datapath: their bridges are ``datapath_type=system`` (OVSDB's empty
default). Machines without the ``openvswitch`` kernel module (as the test machines) can only use the userspace
datapath, ``netdev``. The label bridges belong to the host's configuration (the driver's own VXLAN bridges take the
label bridge's datapath); :meth:`OpenVSwitchDriver.ensure_segment` checks the label bridge's datapath against what
the host can do, with a clear error when it cannot work: ``Open_vSwitch.datapath_types`` says what the
``ovs-vswitchd`` binary supports (it lists ``system`` even where the kernel has no module), and the kernel has the
datapath when its generic netlink family ``ovs_datapath`` exists. :func:`choose_datapath_type` is the rule for
whoever makes a host's bridges: ``system`` where the kernel has it, else ``netdev``. With ``netdev``, namespace-side
veths plugged into the bridge need TX checksum offload off (``ethtool -K <dev> tx off``) or their TCP/UDP leaves
with unfilled checksums; the side that makes such a veth (a router, a netns guest) does that.

``netns``: interfaces (ports) are looked up and brought up in the host's network namespace; the database is
reached at ``ovsdb`` (``unix:<socket>`` or ``tcp:<ip>:<port>``) wherever it is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import typing as t

from controllers.api.v1alpha1.network import Segment, parse_broadcast_uri

from . import NetworkError
from .linuxbridge import VXLAN_OVERHEAD, VXLAN_PORT, vxlan_multicast_group

DEFAULT_OVSDB = "unix:/run/openvswitch/db.sock"
SEGMENT_KEY = "cumulo-segment"   # Port external_ids key marking the ports this driver plugged
PENDING_KEY = "cumulo-pending"   # "true" while recorded before its interface exists (prepare_port)
UNTAGGED = "untagged"
NETNS_DIR = "/run/netns"
IFNAMSIZ = 15
DEFAULT_TIMEOUT = 10.0           # seconds for one OVSDB transaction, including ovs-vswitchd applying it


@dataclasses.dataclass(frozen=True)
class SegmentPlan:
    """What a segment is on an Open vSwitch host."""

    id: str                     # broadcast URI or "untagged": the mark on the segment's ports
    label: str                  # the traffic-label bridge (uplink, underlay address)
    bridge: str                 # the OVS bridge ports plug into
    tag: int | None = None      # VLAN tag of the ports (VLAN segments)
    vni: int | None = None      # VXLAN segments
    device: str | None = None   # their kernel VXLAN device, a port of ``bridge``
    group: str | None = None    # its multicast group
    mtu: int = 1500

    @property
    def owned(self) -> bool:
        """Whether the driver made (and may remove) the bridge: VLAN and untagged ports use the label's."""
        return self.vni is not None


def plan_segment(segment: Segment) -> SegmentPlan:
    """The plan of ``segment``; NetworkError for a segment this driver cannot make."""
    if segment.vswitch != "openvswitch":
        raise NetworkError(f"segment is for vswitch {segment.vswitch!r}, but this host runs the Open vSwitch driver")
    try:
        isolation, vnet = parse_broadcast_uri(segment.broadcast_uri)
    except ValueError as error:
        raise NetworkError(str(error)) from None
    label = segment.traffic_label
    if not label or len(label) > IFNAMSIZ:
        raise NetworkError(f"traffic label {label!r} is not a valid bridge name (1 to {IFNAMSIZ} characters)")
    mark = segment.broadcast_uri or UNTAGGED
    if isolation == "VXLAN":
        assert vnet is not None
        if not 1 <= vnet <= 0xFFFFFF:
            raise NetworkError(f"VNI {vnet} is out of range (1-16777215)")
        bridge = f"brvx-{vnet}"
        # Segments written before the API named brvx-<vni> for Open vSwitch VXLAN carry the label bridge.
        if segment.bridge not in (label, bridge):
            raise NetworkError(f"VXLAN segment {mark} plugs into {bridge!r}, not {segment.bridge!r}")
        return SegmentPlan(id=mark, label=label, bridge=bridge, vni=vnet, device=f"vxlan{vnet}",
                           group=vxlan_multicast_group(vnet), mtu=segment.mtu)
    if segment.bridge != label:
        raise NetworkError(f"on Open vSwitch a segment's ports plug into the label bridge {label!r}, "
                           f"not {segment.bridge!r}")
    if isolation == "VLAN":
        assert vnet is not None
        if not 1 <= vnet <= 4094:
            raise NetworkError(f"VLAN {vnet} is out of range (1-4094)")
        return SegmentPlan(id=mark, label=label, bridge=label, tag=vnet, mtu=segment.mtu)
    return SegmentPlan(id=mark, label=label, bridge=label, mtu=segment.mtu)


def choose_datapath_type(datapath_types: t.Iterable[str], kernel_datapath: bool) -> str:
    """The datapath for a new bridge: the kernel's (``system``) where it works, else the userspace one."""
    available = set(datapath_types)
    if kernel_datapath and "system" in available:
        return "system"
    if "netdev" in available:
        return "netdev"
    raise NetworkError(f"Open vSwitch offers datapaths {sorted(available)} and the kernel has "
                       f"{'an' if kernel_datapath else 'no'} Open vSwitch module: no usable datapath")


def datapath_problem(bridge: str, datapath_type: str, datapath_types: t.Iterable[str],
                     kernel_datapath: bool) -> str | None:
    """Why bridge ``bridge`` with ``datapath_type`` cannot carry traffic on this host, or None."""
    datapath = datapath_type or "system"  # OVSDB's empty value means the kernel datapath
    if datapath not in set(datapath_types):
        return f"bridge {bridge!r} uses datapath {datapath!r}, which this ovs-vswitchd does not offer"
    if datapath == "system" and not kernel_datapath:
        return (f"bridge {bridge!r} uses the kernel datapath (system), but this kernel has no Open vSwitch "
                "module (no ovs_datapath generic netlink family); make it datapath_type=netdev")
    return None


def kernel_has_datapath() -> bool:
    """Whether the kernel has the OVS datapath: its generic netlink family exists (the lookup itself may
    autoload the module). Families are global, not per network namespace. Call it outside an event loop (a
    worker thread): pyroute2's generic netlink socket runs one of its own."""
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.generic import GenericNetlinkSocket

    genl = GenericNetlinkSocket()
    try:
        genl.discovery("ovs_datapath")
    except NetlinkError:
        return False
    finally:
        genl.close()
    return True


class _QuietInterfaceChecks(logging.Filter):
    """ovsdbapp logs a traceback when a port it added has no OpenFlow port yet; the driver checks that itself
    (with the switch's reason), and :meth:`OpenVSwitchDriver.prepare_port` adds ports before their interface
    exists on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and type(record.exc_info[1]).__name__ == "VswitchdInterfaceAddException")


logging.getLogger("ovsdbapp.schema.open_vswitch.impl_idl").addFilter(_QuietInterfaceChecks())


def _is_vxlan_device(port: dict[str, t.Any]) -> bool:
    """Whether a marked port is a VXLAN segment's own device (``vxlan<vni>`` marked ``vxlan://<vni>``)."""
    mark = str(port["external_ids"].get(SEGMENT_KEY, ""))
    return mark.startswith("vxlan://") and port["name"] == f"vxlan{mark[len('vxlan://'):]}"


def _optional(value: t.Any) -> t.Any:
    """An optional OVSDB column's value as ovsdbapp's finds give it ([] when empty), or None."""
    return None if value == [] else value


def _as_list(value: t.Any) -> list[t.Any]:
    # ovsdbapp gives a set column holding one value as that value
    return value if isinstance(value, list) else [value]


def _in_datapath(interface: dict[str, t.Any]) -> bool:
    """Whether ovs-vswitchd opened the interface (it has an OpenFlow port number, -1 meaning it failed)."""
    ofport = _optional(interface["ofport"])
    return ofport is not None and ofport != -1


class OpenVSwitchDriver:
    def __init__(self, netns: str | None = None, ovsdb: str = DEFAULT_OVSDB,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.netns = netns
        self.ovsdb = ovsdb
        self.timeout = timeout
        self._api: t.Any = None
        self._connection: t.Any = None
        self._connect_lock = threading.Lock()
        self._kernel_datapath: bool | None = None
        self._locks: dict[str, asyncio.Lock] = {}

    # -- OVSDB and netlink plumbing (worker threads) -------------------------------------------

    def _ovs(self) -> t.Any:
        """The ovsdbapp API, connected on first use (and again after a failed attempt)."""
        with self._connect_lock:
            if self._api is not None:
                return self._api
            from ovsdbapp.backend.ovs_idl import connection
            from ovsdbapp.schema.open_vswitch import impl_idl

            try:
                idl = connection.OvsdbIdl.from_server(self.ovsdb, "Open_vSwitch")
                conn = connection.Connection(idl=idl, timeout=self.timeout)
                # ovsdbapp keeps its connection in a class attribute (one database per process); a class
                # of our own per driver lets one agent process talk to several hosts' switches.
                api_class = type("OvsdbIdl", (impl_idl.OvsdbIdl,), {"_ovsdb_connection": None})
                api = api_class(conn)  # starts the connection's thread
            except Exception as error:  # ovsdbapp raises bare Exception for an unreachable server
                raise NetworkError(f"cannot reach the Open vSwitch database at {self.ovsdb}: {error}") from None
            self._connection, self._api = conn, api
            return api

    def _execute(self, what: str, *commands: t.Any) -> list[t.Any]:
        from ovsdbapp import exceptions

        api = self._ovs()
        try:
            with api.transaction(check_error=True) as txn:
                for command in commands:
                    txn.add(command)
            return [command.result for command in commands]
        except NetworkError:
            raise
        except exceptions.TimeoutException:
            raise NetworkError(f"{what}: Open vSwitch did not answer within {self.timeout:g}s") from None
        except Exception as error:  # ovsdbapp's RuntimeError, row lookups (RowNotFound), ...
            raise NetworkError(f"{what}: {error}") from None

    def _rows(self, table: str, *conditions: t.Any) -> list[dict[str, t.Any]]:
        api = self._ovs()
        [rows] = self._execute(f"cannot read {table}", api.db_find(table, *conditions))
        return t.cast(list[dict[str, t.Any]], rows)

    def _ipr(self) -> t.Any:
        from pyroute2 import IPRoute

        if self.netns is None:
            return IPRoute()
        # pyroute2 would create a missing namespace; a host namespace that is gone is an error instead.
        if not os.path.exists(os.path.join(NETNS_DIR, self.netns)):
            raise NetworkError(f"host network namespace {self.netns!r} does not exist")
        return IPRoute(netns=self.netns, flags=0)

    def _netlink(self, what: str, function: t.Callable[[t.Any], t.Any]) -> t.Any:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            with self._ipr() as ipr:
                return function(ipr)
        except NetlinkError as error:
            raise NetworkError(f"{what}: {os.strerror(error.code) if error.code else error}") from None
        except OSError as error:
            raise NetworkError(f"{what}: {error}") from None

    def _link_up(self, port: str) -> None:
        """Check ``port`` exists in the host's namespace and bring it up. NetworkError if it does not exist."""
        def up(ipr: t.Any) -> None:
            indexes = ipr.link_lookup(ifname=port)
            if not indexes:
                raise NetworkError(f"port {port!r} does not exist")
            ipr.link("set", index=indexes[0], state="up")

        self._netlink(f"cannot bring {port!r} up", up)

    def _existing_links(self) -> set[str]:
        return {link.get("IFLA_IFNAME") for link in self._netlink("cannot list interfaces",
                                                                   lambda ipr: list(ipr.get_links()))}

    def _kernel(self) -> bool:
        if self._kernel_datapath is None:
            self._kernel_datapath = kernel_has_datapath()
        return self._kernel_datapath

    async def _run(self, function: t.Callable[[], t.Any], lock: str | None = None) -> t.Any:
        if lock is None:
            return await asyncio.to_thread(function)
        async with self._locks.setdefault(lock, asyncio.Lock()):
            return await asyncio.to_thread(function)

    # -- queries ------------------------------------------------------------------------------

    def _bridge(self, name: str) -> dict[str, t.Any] | None:
        rows = self._rows("Bridge", ("name", "=", name))
        return rows[0] if rows else None

    def _port_bridge(self, port: str) -> str | None:
        rows = self._rows("Port", ("name", "=", port))
        if not rows:
            return None
        for bridge in self._rows("Bridge"):
            if rows[0]["_uuid"] in _as_list(bridge["ports"]):
                return t.cast(str, bridge["name"])
        return None

    def _interface(self, name: str) -> dict[str, t.Any] | None:
        rows = self._rows("Interface", ("name", "=", name))
        return rows[0] if rows else None

    def _in_datapath_or_fail(self, port: str, what: str) -> None:
        interface = self._interface(port)
        if interface is None:
            raise NetworkError(f"{what}: the port vanished")
        if not _in_datapath(interface):
            raise NetworkError(f"{what}: Open vSwitch cannot use the interface: "
                               f"{_optional(interface['error']) or 'no OpenFlow port assigned'}")

    def _label_bridge(self, plan: SegmentPlan) -> dict[str, t.Any]:
        bridge = self._bridge(plan.label)
        if bridge is None:
            raise NetworkError(f"traffic label bridge {plan.label!r} is not an Open vSwitch bridge on this host")
        return bridge

    # -- the NetworkDriver interface ----------------------------------------------------------

    async def bridge_exists(self, name: str) -> bool:
        return bool(await self._run(lambda: self._bridge(name) is not None))

    async def ensure_segment(self, segment: Segment) -> None:
        plan = plan_segment(segment)
        await self._run(lambda: self._ensure(plan), lock=plan.bridge)

    def _ensure(self, plan: SegmentPlan) -> None:
        label = self._label_bridge(plan)
        [switch] = self._rows("Open_vSwitch")
        problem = datapath_problem(plan.label, label["datapath_type"], switch["datapath_types"], self._kernel())
        if problem:
            raise NetworkError(problem)
        if plan.vni is None:
            return  # VLAN and untagged ports go straight onto the label bridge
        what = f"cannot make segment {plan.id}"
        self._netlink(what, lambda ipr: self._ensure_vxlan_device(ipr, plan))
        api = self._ovs()
        # The segment's bridge runs on the label bridge's datapath: the one this host's switch uses.
        self._execute(what, api.add_br(plan.bridge, may_exist=True, datapath_type=label["datapath_type"] or None))
        assert plan.device is not None
        if self._port_bridge(plan.device) != plan.bridge:
            self._execute(what, api.del_port(plan.device, if_exists=True),
                          api.add_port(plan.bridge, plan.device, may_exist=False),
                          api.db_set("Port", plan.device, ("external_ids", {SEGMENT_KEY: plan.id})))
        self._in_datapath_or_fail(plan.device, what)

    def _ensure_vxlan_device(self, ipr: t.Any, plan: SegmentPlan) -> None:
        """The kernel VXLAN device of the segment on the label bridge's internal port (the underlay address)."""
        indexes = ipr.link_lookup(ifname=plan.label)
        if not indexes:
            raise NetworkError(f"traffic label bridge {plan.label!r} has no interface on this host")
        label = ipr.get_links(indexes[0])[0]
        if label.get("IFLA_MTU") < plan.mtu + VXLAN_OVERHEAD:
            raise NetworkError(f"VXLAN segment MTU {plan.mtu} needs {plan.label!r} to have an MTU of at least "
                               f"{plan.mtu + VXLAN_OVERHEAD}, not {label.get('IFLA_MTU')}")
        existing = ipr.link_lookup(ifname=plan.device)
        if existing:
            device = ipr.get_links(existing[0])[0]
            info = ("IFLA_LINKINFO", "IFLA_INFO_DATA")
            if (device.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") != "vxlan"
                    or device.get_nested(*info, "IFLA_VXLAN_ID") != plan.vni
                    or device.get_nested(*info, "IFLA_VXLAN_LINK") != label["index"]
                    or device.get_nested(*info, "IFLA_VXLAN_GROUP") != plan.group):
                ipr.link("del", index=existing[0])  # a leftover with other parameters
                existing = []
        if not existing:
            ipr.link("add", ifname=plan.device, kind="vxlan", vxlan_id=plan.vni, vxlan_group=plan.group,
                     vxlan_link=label["index"], vxlan_port=VXLAN_PORT, vxlan_learning=1, vxlan_ttl=10, mtu=plan.mtu)
        index = ipr.link_lookup(ifname=plan.device)[0]
        ipr.link("set", index=index, mtu=plan.mtu, state="up")

    async def plug(self, segment: Segment, port: str) -> None:
        plan = plan_segment(segment)
        await self._run(lambda: self._plug(plan, port), lock=plan.bridge)

    async def prepare_port(self, segment: Segment, port: str) -> None:
        """Record ``port`` on the segment, with its tag, before its interface exists: ``ovs-vswitchd`` opens
        the interface the moment it appears (libvirt makes a guest's tap when the domain starts), so the guest
        is never up unplugged or untagged, and an agent that dies at any point leaves nothing half done (the
        record is in OVSDB, which outlives the agent). :meth:`plug` afterwards checks the port works."""
        plan = plan_segment(segment)
        await self._run(lambda: self._plug(plan, port, prepare=True), lock=plan.bridge)

    def _plug(self, plan: SegmentPlan, port: str, prepare: bool = False) -> None:
        if not prepare:
            self._link_up(port)
        self._label_bridge(plan)
        if plan.owned and self._bridge(plan.bridge) is None:
            raise NetworkError(f"bridge {plan.bridge!r} does not exist (segment not ensured)")
        api = self._ovs()
        what = f"cannot plug {port!r} into {plan.bridge!r}"
        commands = []
        current = self._port_bridge(port)
        if current is not None and current != plan.bridge:
            commands.append(api.del_port(port, bridge=current, if_exists=True))
        if current != plan.bridge:
            commands.append(api.add_port(plan.bridge, port, may_exist=False))
        if plan.tag is None:
            if current == plan.bridge:  # a row inserted in this transaction has no tag to clear (nor the column)
                commands.append(api.db_clear("Port", port, "tag"))
        else:
            commands.append(api.db_set("Port", port, ("tag", plan.tag)))
        marks = {SEGMENT_KEY: plan.id, PENDING_KEY: "true" if prepare else "false"}
        commands.append(api.db_set("Port", port, ("external_ids", marks)))
        commands.append(api.db_set("Interface", port, ("mtu_request", plan.mtu)))
        self._execute(what, *commands)
        if not prepare:
            self._in_datapath_or_fail(port, what)
            # Guests' taps vanish with their QEMU while their records stay; a busy host's label bridge would
            # collect them (VLAN segments are released only once no guest uses the label bridge at all).
            self._remove_dead_ports(what, keep={port, plan.device}, pending=False)

    def _remove_dead_ports(self, what: str, keep: set[str | None], pending: bool) -> None:
        """Drop the records of marked ports whose interface is gone from the host, whatever their segment (a
        port whose interface is gone is dead), but never a segment's own VXLAN device, and records still
        waiting for their interface (:meth:`prepare_port`) only when ``pending``."""
        ports = [port for port in self._rows("Port") if SEGMENT_KEY in (port["external_ids"] or {})
                 and port["name"] not in keep and (pending or port["external_ids"].get(PENDING_KEY) != "true")
                 and not _is_vxlan_device(port)]
        existing = self._existing_links() if ports else set()
        dead = [port["name"] for port in ports if port["name"] not in existing]
        if dead:
            api = self._ovs()
            self._execute(what, *(api.del_port(name, if_exists=True) for name in dead))

    async def unplug(self, segment: Segment, port: str) -> None:
        plan = plan_segment(segment)
        await self._run(lambda: self._unplug(plan, port), lock=plan.bridge)

    def _unplug(self, plan: SegmentPlan, port: str) -> None:
        if self._port_bridge(port) != plan.bridge:
            return  # gone already, or moved to another bridge by someone else
        api = self._ovs()
        self._execute(f"cannot unplug {port!r} from {plan.bridge!r}",
                      api.del_port(port, bridge=plan.bridge, if_exists=True))

    async def release_segment(self, segment: Segment) -> None:
        plan = plan_segment(segment)
        await self._run(lambda: self._release(plan), lock=plan.bridge)

    def _release(self, plan: SegmentPlan) -> bool:
        """Drop the records of the segment's ports whose interface is gone from the host (a guest's tap that
        died with QEMU); VLAN and untagged segments have nothing else of their own. A VXLAN segment's bridge
        and device go when no other port is left on the bridge. Whether the segment is gone."""
        api = self._ovs()
        what = f"cannot release segment {plan.id}"
        # Every dead port, not only this segment's: the agent tracks VLAN segments by bridge, which all VLANs of
        # a label share.
        self._remove_dead_ports(what, keep={plan.device}, pending=True)
        if not plan.owned:
            return True
        if self._bridge(plan.bridge) is not None:
            if set(self._ports_of(plan.bridge)) - {plan.bridge, plan.device}:
                return False
            self._execute(what, api.del_br(plan.bridge, if_exists=True))

        def delete_device(ipr: t.Any) -> None:
            for index in ipr.link_lookup(ifname=plan.device):
                ipr.link("del", index=index)

        self._netlink(what, delete_device)
        return True

    def _ports_of(self, bridge: str) -> list[str]:
        row = self._bridge(bridge)
        if row is None:
            return []
        uuids = set(_as_list(row["ports"]))
        return [port["name"] for port in self._rows("Port") if port["_uuid"] in uuids]

    async def ports(self, segment: Segment) -> list[str]:
        """Ports this driver plugged into the segment (by their ``cumulo-segment`` mark and tag), the segment's
        own VXLAN device excluded."""
        plan = plan_segment(segment)

        def query() -> list[str]:
            on_bridge = set(self._ports_of(plan.bridge))
            rows = self._rows("Port", ("external_ids", "=", {SEGMENT_KEY: plan.id}))
            return sorted(row["name"] for row in rows if _optional(row["tag"]) == plan.tag
                          and row["name"] in on_bridge and row["name"] != plan.device)

        return t.cast(list[str], await self._run(query))

    async def segments(self) -> list[Segment]:
        """The VXLAN segments present on the host (bridges ``brvx-<vni>`` holding their marked device), rebuilt
        from OVSDB and the kernel: what an agent that restarted may have to release. VLAN and untagged segments
        own nothing to release."""

        def query() -> list[Segment]:
            devices = {port["name"]: port["external_ids"][SEGMENT_KEY] for port in self._rows("Port")
                       if str((port["external_ids"] or {}).get(SEGMENT_KEY, "")).startswith("vxlan://")}

            def links(ipr: t.Any) -> dict[str, t.Any]:
                every = {link["index"]: link for link in ipr.get_links()}
                return {link.get("IFLA_IFNAME"): (link, every) for link in every.values()}

            kernel = self._netlink("cannot list interfaces", links) if devices else {}
            found = []
            for name, uri in devices.items():
                _, vni = parse_broadcast_uri(uri)
                if name != f"vxlan{vni}" or name not in kernel or self._port_bridge(name) != f"brvx-{vni}":
                    continue
                link, every = kernel[name]
                label = every.get(link.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA", "IFLA_VXLAN_LINK"))
                if label is not None:
                    found.append(Segment(vswitch="openvswitch", traffic_label=label.get("IFLA_IFNAME"),
                                         broadcast_uri=uri, bridge=f"brvx-{vni}", mtu=link.get("IFLA_MTU")))
            return sorted(found, key=lambda segment: segment.bridge)

        return t.cast(list[Segment], await self._run(query))

    async def close(self) -> None:
        connection, self._connection, self._api = self._connection, None, None
        if connection is not None:
            await asyncio.to_thread(connection.stop)
