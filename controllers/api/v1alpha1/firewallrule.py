"""FirewallRule: ingress rules on a public address, or egress rules of a guest network."""

from __future__ import annotations

import typing as t

from pydantic import ConfigDict, Field

from .common import (
    NAMESPACED,
    STATUS_SUBRESOURCE,
    Cidrs,
    Model,
    Name,
    PortRange,
    Protocol,
    Resource,
    ResourceStatus,
    Rule,
    StrEnum,
    column,
    rules,
)


class Direction(StrEnum):
    INGRESS = "Ingress"
    EGRESS = "Egress"


IcmpValue = t.Annotated[int, Field(ge=-1, le=255)]


TRAFFIC_MATCH_RULES = (
    Rule("!has(self.ports) || self.protocol in ['TCP', 'UDP']", "ports apply to TCP and UDP only",
         field_path=".ports"),
    Rule("self.protocol == 'ICMP' || !has(self.icmpType) && !has(self.icmpCode)",
         "icmpType and icmpCode apply to ICMP only", field_path=".icmpType"),
)


class TrafficMatch(Model):
    """Protocol, ports and addresses a rule matches; shared by firewall and security-group rules."""

    model_config = ConfigDict(json_schema_extra=rules(*TRAFFIC_MATCH_RULES))

    protocol: Protocol = Field(Protocol.TCP, description="TCP, UDP, ICMP or All.")
    ports: PortRange | None = Field(None, description="TCP/UDP ports; every port when unset.")
    icmp_type: IcmpValue | None = Field(None, description="ICMP type; -1 or unset for every type.")
    icmp_code: IcmpValue | None = Field(None, description="ICMP code; -1 or unset for every code.")
    cidrs: Cidrs = Field(
        default_factory=list, description="Remote CIDRs (sources for ingress, destinations for egress); "
        "any address when empty."
    )


class FirewallRuleSpec(TrafficMatch):
    """What the rule allows."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            Rule("self.direction == 'Ingress' ? has(self.publicIpAddress) && !has(self.network) "
                 ": has(self.network) && !has(self.publicIpAddress)",
                 "an Ingress rule names a publicIpAddress; an Egress rule names a network", field_path=".direction"),
            *TRAFFIC_MATCH_RULES,
        )
    )

    direction: Direction = Field(Direction.INGRESS, description="Ingress to a public address, or Egress from guests.")
    public_ip_address: Name | None = Field(None, description="Ingress: the PublicIPAddress (same namespace).")
    network: Name | None = Field(None, description="Egress: the Network (same namespace).")


class FirewallRule(
    Resource,
    scope=NAMESPACED,
    short_names=["fwr"],
    subresources=STATUS_SUBRESOURCE,
    printer_columns=[
        column("Direction", ".spec.direction"),
        column("Public-IP", ".spec.publicIpAddress"),
        column("Network", ".spec.network"),
        column("Protocol", ".spec.protocol"),
        column("Phase", ".status.phase"),
    ],
):
    """A firewall rule: allowed ingress to a public address or allowed egress from a network."""

    spec: FirewallRuleSpec = Field(description="What the rule allows.")
    status: ResourceStatus = Field(default_factory=ResourceStatus, description="Observed state of the rule.")
