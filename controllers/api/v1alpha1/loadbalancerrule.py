"""LoadBalancerRule: balance a public port over guests, in the network's virtual router."""

from __future__ import annotations

import typing as t

from pydantic import ConfigDict, Field

from .common import (
    NAMESPACED,
    STATUS_SUBRESOURCE,
    Cidrs,
    Model,
    Name,
    ObjectReference,
    Port,
    Resource,
    ResourceStatus,
    Rule,
    StrEnum,
    column,
    rules,
)
from .portforwardingrule import TransportProtocol


class LbAlgorithm(StrEnum):
    ROUND_ROBIN = "RoundRobin"
    LEAST_CONN = "LeastConn"
    SOURCE = "Source"


class HealthCheck(Model):
    """A TCP connect check of each member; failing members get no new connections."""

    interval_seconds: t.Annotated[int, Field(ge=1, le=600)] = Field(5, description="Seconds between checks.")
    timeout_seconds: t.Annotated[int, Field(ge=1, le=60)] = Field(2, description="Seconds before a check fails.")
    unhealthy_threshold: t.Annotated[int, Field(ge=1, le=10)] = Field(
        2, description="Consecutive failures marking a member unhealthy."
    )
    healthy_threshold: t.Annotated[int, Field(ge=1, le=10)] = Field(
        2, description="Consecutive successes marking a member healthy again."
    )


class LoadBalancerRuleSpec(Model):
    """Desired load balancing."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            Rule("self.members.all(a, self.members.exists_one(b, b.name == a.name))", "each member appears once",
                 field_path=".members"),
        )
    )

    public_ip_address: Name = Field(description="The PublicIPAddress (same namespace).")
    protocol: TransportProtocol = Field(TransportProtocol.TCP, description="TCP or UDP.")
    public_port: Port = Field(description="Port on the public address.")
    private_port: Port = Field(description="Port on the members.")
    algorithm: LbAlgorithm = Field(LbAlgorithm.ROUND_ROBIN, description="RoundRobin, LeastConn or Source.")
    members: t.Annotated[list[ObjectReference], Field(max_length=256)] = Field(
        default_factory=list, description="Guests (same namespace) to balance over."
    )
    source_cidrs: Cidrs = Field(
        default_factory=list, description="Only balance traffic from these CIDRs; from anywhere when empty."
    )
    health_check: HealthCheck | None = Field(None, description="Check members and skip unhealthy ones.")


class MemberState(Model):
    """State of one member as the router sees it."""

    name: str = Field(description="The guest.")
    ip_address: str | None = Field(None, description="Address traffic goes to.")
    healthy: bool | None = Field(None, description="Result of the health check, when there is one.")


class LoadBalancerRuleStatus(ResourceStatus):
    """Observed state of a load balancer rule."""

    members: list[MemberState] = Field(default_factory=list, description="Members the router balances over.")


class LoadBalancerRule(
    Resource,
    scope=NAMESPACED,
    short_names=["lbr"],
    subresources=STATUS_SUBRESOURCE,
    printer_columns=[
        column("Public-IP", ".spec.publicIpAddress"),
        column("Public-Port", ".spec.publicPort", "integer"),
        column("Private-Port", ".spec.privatePort", "integer"),
        column("Algorithm", ".spec.algorithm"),
        column("Phase", ".status.phase"),
    ],
):
    """A load balancer rule on a public address of an isolated network."""

    spec: LoadBalancerRuleSpec = Field(description="Desired load balancing.")
    status: LoadBalancerRuleStatus = Field(default_factory=LoadBalancerRuleStatus, description="Observed state.")
