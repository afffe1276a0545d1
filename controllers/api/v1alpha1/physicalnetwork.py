"""PhysicalNetwork: a zone's physical network, its isolation method and the bridges each traffic type uses."""

from __future__ import annotations

import typing as t

from pydantic import ConfigDict, Field

from .common import (
    CLUSTER,
    IMMUTABLE,
    PHASE_COLUMN,
    STATUS_SUBRESOURCE,
    DisplayText,
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
)


class IsolationMethod(StrEnum):
    """How guest networks are kept apart on the wire."""

    VLAN = "VLAN"
    VXLAN = "VXLAN"


class VSwitch(StrEnum):
    """The virtual switch the host agents use for this network."""

    LINUX_BRIDGE = "linuxbridge"
    OPEN_VSWITCH = "openvswitch"


class TrafficType(StrEnum):
    GUEST = "Guest"
    PUBLIC = "Public"
    MANAGEMENT = "Management"
    STORAGE = "Storage"


class VnetRange(Model):
    """An inclusive range of VLAN IDs or VXLAN network identifiers."""

    model_config = ConfigDict(json_schema_extra=rules(Rule("self.start <= self.end", "start must not exceed end")))

    start: t.Annotated[int, Field(ge=1, le=16777214)] = Field(description="First ID of the range.")
    end: t.Annotated[int, Field(ge=1, le=16777214)] = Field(description="Last ID of the range.")


class TrafficTypeLabel(Model):
    """A traffic type carried by this physical network and the host bridge (label) that carries it."""

    type: TrafficType = Field(description="Guest, Public, Management or Storage.")
    label: t.Annotated[str, Field(min_length=1, max_length=15, pattern=r"^[A-Za-z0-9][-_.A-Za-z0-9]*$")] = Field(
        description="Name of the bridge on each host that carries this traffic (a Linux interface name)."
    )


class PublicIpRange(Model):
    """A range of public addresses of an advanced zone, for source NAT, static NAT and load balancers."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            address_in_cidr("gateway"),
            address_in_cidr("startIp"),
            address_in_cidr("endIp"),
            address_range(),
        )
    )

    cidr: IPv4Cidr = Field(description="The public subnet, for example 203.0.113.0/24.")
    gateway: IPv4Address = Field(description="The upstream gateway of the public subnet.")
    start_ip: IPv4Address = Field(alias="startIp", description="First address Cumulo may hand out.")
    end_ip: IPv4Address = Field(alias="endIp", description="Last address Cumulo may hand out.")
    vlan: t.Annotated[int, Field(ge=1, le=4094)] | None = Field(
        None, description="VLAN the public range is on; untagged when unset."
    )


class PhysicalNetworkSpec(Model):
    """Desired state of a physical network."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            Rule("self.isolationMethod != 'VLAN' || self.vnetRanges.all(r, r.end <= 4094)",
                 "VLAN IDs go from 1 to 4094", field_path=".vnetRanges"),
            Rule("self.trafficTypes.all(a, self.trafficTypes.exists_one(b, b.type == a.type))",
                 "each traffic type appears once", field_path=".trafficTypes"),
            Rule("self.vnetRanges.all(a, self.vnetRanges.all(b, a == b || a.end < b.start || b.end < a.start))",
                 "vnetRanges must not overlap", field_path=".vnetRanges"),
            Rule("self.publicIpRanges.size() == 0 || self.trafficTypes.exists(t, t.type == 'Public')",
                 "publicIpRanges need the Public traffic type", field_path=".publicIpRanges"),
        )
    )

    zone: t.Annotated[Name, IMMUTABLE] = Field(description="Zone of the physical network. Immutable.")
    display_text: DisplayText = Field("", description="Human-readable description.")
    isolation_method: t.Annotated[IsolationMethod, IMMUTABLE] = Field(
        IsolationMethod.VLAN, description="VLAN or VXLAN. Immutable."
    )
    vswitch: VSwitch = Field(VSwitch.LINUX_BRIDGE, description="linuxbridge or openvswitch.")
    vnet_ranges: t.Annotated[list[VnetRange], Field(max_length=16)] = Field(
        default_factory=list, description="VLAN IDs or VNIs available to guest networks."
    )
    traffic_types: t.Annotated[list[TrafficTypeLabel], Field(min_length=1, max_length=4)] = Field(
        description="Traffic types carried, each with the bridge label hosts use for it."
    )
    public_ip_ranges: t.Annotated[list[PublicIpRange], Field(max_length=32)] = Field(
        default_factory=list, description="Public address ranges (advanced zones)."
    )
    mtu: t.Annotated[int, Field(ge=576, le=9216)] = Field(1500, description="MTU of the underlying network.")
    enabled: bool = Field(True, description="Disabled physical networks implement no new guest networks.")


class PhysicalNetworkStatus(ResourceStatus):
    """Observed state of a physical network."""

    vnets_total: int | None = Field(None, description="Number of VLAN IDs or VNIs in the ranges.")
    vnets_allocated: int | None = Field(None, description="Number taken by implemented guest networks.")
    public_ips_total: int | None = Field(None, description="Number of public addresses in the ranges.")
    public_ips_allocated: int | None = Field(None, description="Number of public addresses in use.")


class PhysicalNetwork(
    Resource,
    scope=CLUSTER,
    short_names=["pnet"],
    subresources=STATUS_SUBRESOURCE,
    printer_columns=[
        column("Zone", ".spec.zone"),
        column("Isolation", ".spec.isolationMethod"),
        column("VSwitch", ".spec.vswitch"),
        PHASE_COLUMN,
        column("VNets", ".status.vnetsAllocated", "integer", 1),
        column("Public-IPs", ".status.publicIpsAllocated", "integer", 1),
    ],
):
    """A physical network of a zone: isolation method, VLAN/VNI ranges, traffic labels and public ranges."""

    selectable_fields = (".spec.zone",)

    spec: PhysicalNetworkSpec = Field(description="Desired state of the physical network.")
    status: PhysicalNetworkStatus = Field(
        default_factory=PhysicalNetworkStatus, description="Observed state of the physical network."
    )
