"""VirtualRouter: the router of a guest network (CloudStack's router system VM), run as a network namespace
on a host by that host's agent.

The controller makes and keeps it while its Network is implemented. Its spec is the router's whole resolved
configuration (DESIGN.md §3, resolved hand-off): the segments it plugs into, its addresses, the DHCP leases
IPAM gave, NAT, port forwarding, firewall, egress and load balancing. The agent of ``spec.host`` (the object
carries the label ``cumulo.io/host``) applies it declaratively and reports under ``status.node``.
"""

from __future__ import annotations

import datetime

from pydantic import Field

from .common import (
    NAMESPACED,
    STATUS_SUBRESOURCE,
    Model,
    Resource,
    ResourceStatus,
    column,
)
from .network import Segment, TrafficRule


class RouterInterface(Model):
    """An interface of the router on a segment."""

    segment: Segment = Field(description="The segment it plugs into.")
    mac_address: str = Field(description="MAC address.")
    addresses: list[str] = Field(description="Addresses in CIDR notation (ip/prefix); the first is primary.")


class DhcpLease(Model):
    """A fixed lease: the router answers this MAC with this address and host name."""

    mac_address: str = Field(description="MAC address of the guest NIC.")
    ip_address: str = Field(description="Address IPAM gave the NIC.")
    hostname: str = Field(description="Host name, also served by DNS.")
    default: bool = Field(True, description="Offer the default route and DNS servers (the guest's default NIC).")


class IngressRule(TrafficRule):
    """Allowed ingress to a public address (a FirewallRule)."""

    public_ip: str = Field(description="The public address.")


class StaticNatEntry(Model):
    """One-to-one NAT between a public address and a guest address."""

    public_ip: str = Field(description="The public address.")
    private_ip: str = Field(description="The guest address.")


class PortForward(Model):
    """Forward a port range of a public address to a guest."""

    name: str = Field(description="The PortForwardingRule.")
    public_ip: str = Field(description="The public address.")
    protocol: str = Field("TCP", description="TCP or UDP.")
    public_port_start: int = Field(description="First public port.")
    public_port_end: int = Field(description="Last public port.")
    private_ip: str = Field(description="The guest address.")
    private_port_start: int = Field(description="First guest port (the range has the public range's length).")
    source_cidrs: list[str] = Field(default_factory=list, description="Only from these CIDRs; anywhere when empty.")


class LoadBalancer(Model):
    """Balance connections to a public port over guest addresses."""

    name: str = Field(description="The LoadBalancerRule.")
    public_ip: str = Field(description="The public address.")
    protocol: str = Field("TCP", description="TCP or UDP.")
    public_port: int = Field(description="Public port.")
    private_port: int = Field(description="Port on the members.")
    algorithm: str = Field("RoundRobin", description="RoundRobin, LeastConn or Source.")
    members: list[str] = Field(default_factory=list, description="Member addresses, in a stable order.")
    source_cidrs: list[str] = Field(default_factory=list, description="Only from these CIDRs; anywhere when empty.")


class VirtualRouterSpec(Model):
    """The router's resolved configuration, written by the controller."""

    network: str = Field(description="The Network (same namespace) the router serves.")
    network_uid: str = Field(description="uid of that Network; names the router's network namespace.")
    host: str = Field(description="Host whose agent runs the router.")
    guest: RouterInterface = Field(description="Interface on the guest network.")
    gateway: str | None = Field(
        None, description="Gateway DHCP hands to guests: the router itself on isolated networks, the network's "
        "own gateway on shared ones; none on networks without a gateway."
    )
    public: RouterInterface | None = Field(
        None, description="Interface on the public network carrying every public address of the network."
    )
    public_gateway: str | None = Field(None, description="Upstream gateway of the public range (default route).")
    source_nat_ip: str | None = Field(None, description="Address guests' outbound traffic is translated to.")
    dhcp: bool = Field(True, description="Serve DHCP.")
    dns: bool = Field(True, description="Serve DNS for guest names and forward the rest.")
    domain: str = Field("cloud.internal", description="DNS domain of guests.")
    dns_servers: list[str] = Field(default_factory=list, description="Upstream resolvers (the zone's DNS).")
    leases: list[DhcpLease] = Field(default_factory=list, description="Fixed leases, one per guest NIC.")
    firewall: list[IngressRule] = Field(
        default_factory=list, description="Allowed ingress to public addresses; other ingress is dropped."
    )
    egress_default_allow: bool = Field(True, description="Guests' egress when no egress rule matches.")
    egress: list[TrafficRule] = Field(
        default_factory=list, description="Egress rules: exceptions to the default (allowed when the default "
        "denies, denied when it allows), as CloudStack's egress rules behave."
    )
    static_nats: list[StaticNatEntry] = Field(default_factory=list, description="Static NAT mappings.")
    port_forwards: list[PortForward] = Field(default_factory=list, description="Port forwarding.")
    load_balancers: list[LoadBalancer] = Field(default_factory=list, description="Load balancers.")


class RouterNode(Model):
    """What the agent running the router observes (owned by the agent)."""

    host: str | None = Field(None, description="Host of the reporting agent.")
    namespace: str | None = Field(None, description="The router's network namespace on that host.")
    state: str | None = Field(None, description="Running or Error.")
    message: str = Field("", description="Last error applying the configuration.")
    applied_generation: int | None = Field(None, description="metadata.generation of the spec last applied.")
    dnsmasq_pid: int | None = Field(None, description="PID of the router's dnsmasq.")
    reported_at: datetime.datetime | None = Field(None, description="When the agent last reported.")


class VirtualRouterStatus(ResourceStatus):
    """Observed state of the router."""

    node: RouterNode | None = Field(None, description="What the agent observes.")


class VirtualRouter(
    Resource,
    scope=NAMESPACED,
    short_names=["vr"],
    subresources=STATUS_SUBRESOURCE,
    printer_columns=[
        column("Network", ".spec.network"),
        column("Host", ".spec.host"),
        column("State", ".status.node.state"),
        column("Source-NAT", ".spec.sourceNatIp", priority=1),
        column("Phase", ".status.phase"),
    ],
):
    """A guest network's virtual router: DHCP, DNS, NAT, firewall and load balancing in a network namespace."""

    selectable_fields = (".spec.network", ".spec.host")

    spec: VirtualRouterSpec = Field(description="The router's resolved configuration (written by the controller).")
    status: VirtualRouterStatus = Field(default_factory=VirtualRouterStatus, description="Observed state.")
