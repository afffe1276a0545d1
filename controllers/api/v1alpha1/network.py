"""Network: a guest network (isolated, shared or L2) of a namespace."""

from __future__ import annotations

import typing as t

from pydantic import ConfigDict, Field

from .common import (
    IMMUTABLE,
    NAMESPACED,
    STATUS_SUBRESOURCE,
    DisplayText,
    DnsLabel,
    IPv4Address,
    IPv4Cidr,
    Model,
    Name,
    Resource,
    ResourceStatus,
    Rule,
    StrEnum,
    column,
    address_in_cidr,
    address_range,
    rules,
    set_at_creation,
)


VXLAN_PREFIX, VLAN_PREFIX = "vxlan://", "vlan://"


def broadcast_uri(isolation: str, vnet: int | None) -> str | None:
    """CloudStack's broadcast URI of a segment: ``vlan://<id>``, ``vxlan://<vni>``, or None (untagged)."""
    if vnet is None:
        return None
    return f"{VXLAN_PREFIX if isolation == 'VXLAN' else VLAN_PREFIX}{vnet}"


def parse_broadcast_uri(uri: str | None) -> tuple[str | None, int | None]:
    """``("VXLAN", 5001)``, ``("VLAN", 100)`` or ``(None, None)`` for an untagged segment."""
    if not uri:
        return None, None
    for isolation, prefix in (("VXLAN", VXLAN_PREFIX), ("VLAN", VLAN_PREFIX)):
        if uri.startswith(prefix):
            return isolation, int(uri[len(prefix):])
    raise ValueError(f"not a broadcast URI: {uri!r}")


def guest_bridge(vswitch: str, label: str, uri: str | None) -> str:
    """The bridge a segment's ports plug into on a host (names as CloudStack's KVM scripts make them,
    kept within Linux's 15 characters). Open vSwitch plugs VLAN-tagged ports into the label bridge itself; a
    VXLAN segment has a bridge of its own on either switch."""
    isolation, vnet = parse_broadcast_uri(uri)
    if isolation == "VXLAN":
        return f"brvx-{vnet}"
    if vswitch == "openvswitch" or isolation is None:
        return label
    return f"brvlan-{vnet}"


class Segment(Model):
    """An L2 segment of a guest or public network on a host, resolved by the controller for the agent."""

    vswitch: str = Field("linuxbridge", description="linuxbridge or openvswitch.")
    traffic_label: str = Field(description="The host bridge carrying this traffic type (PhysicalNetwork label).")
    broadcast_uri: str | None = Field(None, description="vlan://<id> or vxlan://<vni>; untagged when unset.")
    bridge: str = Field(description="The bridge ports of the segment plug into on the host.")
    mtu: int = Field(1500, description="MTU of the segment (VXLAN takes 50 bytes of the physical network's).")


class TrafficRule(Model):
    """A resolved allow rule (firewall, egress or security group) as the agent applies it."""

    protocol: str = Field("All", description="TCP, UDP, ICMP or All.")
    port_start: int | None = Field(None, description="First TCP/UDP port; every port when unset.")
    port_end: int | None = Field(None, description="Last TCP/UDP port.")
    icmp_type: int | None = Field(None, description="ICMP type; every type when unset or -1.")
    icmp_code: int | None = Field(None, description="ICMP code; every code when unset or -1.")
    cidrs: list[str] = Field(default_factory=list, description="Remote CIDRs; any address when empty.")


class NetworkPhase(StrEnum):
    """CloudStack's network states."""

    ALLOCATED = "Allocated"
    IMPLEMENTING = "Implementing"
    IMPLEMENTED = "Implemented"
    SHUTDOWN = "Shutdown"
    DESTROYED = "Destroyed"


class SharedWith(Model):
    """Namespaces allowed to attach guests to a shared network."""

    all_namespaces: bool = Field(False, description="Every namespace may use the network.")
    namespaces: t.Annotated[list[DnsLabel], Field(max_length=256)] = Field(
        default_factory=list, description="These namespaces may use the network."
    )


class NetworkSpec(Model):
    """Desired state of a guest network."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            Rule("has(self.cidr) == has(self.gateway)", "give cidr and gateway together", field_path=".gateway"),
            address_in_cidr("gateway"),
            Rule("has(self.startIp) == has(self.endIp)", "give startIp and endIp together", field_path=".startIp"),
            Rule("!has(self.startIp) || has(self.cidr)", "an IP range needs cidr and gateway", field_path=".startIp"),
            address_in_cidr("startIp"),
            address_in_cidr("endIp"),
            address_range(),
            Rule("!has(self.cidr) || !isCIDR(self.cidr) || cidr(self.cidr).prefixLength() <= 29",
                 "cidr must hold at least 8 addresses (/29 or larger)", field_path=".cidr"),
            set_at_creation("physicalNetwork", "cidr", "gateway", "vlan"),
        )
    )

    network_offering: t.Annotated[Name, IMMUTABLE] = Field(description="The NetworkOffering. Immutable.")
    zone: t.Annotated[Name, IMMUTABLE] = Field(description="Zone of the network. Immutable.")
    display_text: DisplayText = Field("", description="Human-readable description.")
    physical_network: t.Annotated[Name, IMMUTABLE] | None = Field(
        None, description="PhysicalNetwork to implement on; the zone's guest physical network when unset."
    )
    cidr: t.Annotated[IPv4Cidr, IMMUTABLE] | None = Field(
        None, description="Guest CIDR; the zone's guestCidr when unset (not used by L2 networks). Immutable."
    )
    gateway: t.Annotated[IPv4Address, IMMUTABLE] | None = Field(
        None, description="Gateway of the network, given together with cidr. Immutable."
    )
    start_ip: IPv4Address | None = Field(
        None, alias="startIp", description="First address IPAM may give guests (shared networks)."
    )
    end_ip: IPv4Address | None = Field(None, alias="endIp", description="Last address IPAM may give guests.")
    vlan: t.Annotated[int, Field(ge=1, le=16777214), IMMUTABLE] | None = Field(
        None, description="Admin only: VLAN ID or VNI to use, for offerings with specifyVlan. Immutable."
    )
    network_domain: t.Annotated[str, Field(max_length=253)] | None = Field(
        None, description="DNS domain of guests; the zone's when unset."
    )
    shared_with: SharedWith | None = Field(
        None, description="Shared networks only: the other namespaces that may attach guests."
    )


class RouterInfo(Model):
    """The network's virtual router: a network namespace on a host, run by that host's agent."""

    host: str | None = Field(None, description="Host running the router.")
    namespace: str | None = Field(None, description="Name of the network namespace on that host.")
    guest_ip: str | None = Field(None, description="Router address on the guest network.")
    public_ip: str | None = Field(None, description="Router source-NAT address.")
    state: str | None = Field(None, description="Running, Starting, Stopped or Error.")


class NetworkStatus(ResourceStatus):
    """Observed state of a guest network."""

    guest_ip_type: str | None = Field(None, description="Isolated, Shared or L2, from the offering.")
    cidr: str | None = Field(None, description="The CIDR in use.")
    gateway: str | None = Field(None, description="The gateway in use.")
    physical_network: str | None = Field(None, description="PhysicalNetwork it is implemented on.")
    broadcast_uri: str | None = Field(None, description="vlan://<id> or vxlan://<vni> while implemented.")
    router: RouterInfo | None = Field(None, description="The virtual router, while implemented.")
    source_nat_ip: str | None = Field(None, description="Source NAT public address of an isolated network.")
    ips_total: int | None = Field(None, description="Addresses IPAM may hand out.")
    ips_allocated: int | None = Field(None, description="Addresses handed out.")


class Network(
    Resource,
    scope=NAMESPACED,
    short_names=["gnet"],
    subresources=STATUS_SUBRESOURCE,
    printer_columns=[
        column("Phase", ".status.phase"),
        column("Type", ".status.guestIpType"),
        column("CIDR", ".status.cidr"),
        column("Broadcast", ".status.broadcastUri"),
        column("Source-NAT", ".status.sourceNatIp", priority=1),
        column("Router-Host", ".status.router.host", priority=1),
    ],
):
    """A guest network."""

    selectable_fields = (".spec.zone", ".spec.networkOffering", ".status.physicalNetwork")

    spec: NetworkSpec = Field(description="Desired state of the network.")
    status: NetworkStatus = Field(default_factory=NetworkStatus, description="Observed state of the network.")
