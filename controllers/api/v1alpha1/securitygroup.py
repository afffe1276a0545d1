"""SecurityGroup: stateful ingress/egress rules enforced on each member guest's port (basic zones)."""

from __future__ import annotations

import typing as t

from pydantic import ConfigDict, Field

from .common import (
    NAMESPACED,
    STATUS_SUBRESOURCE,
    Description,
    Model,
    Name,
    Resource,
    ResourceStatus,
    column,
    rules,
)
from .firewallrule import TRAFFIC_MATCH_RULES, TrafficMatch


class SecurityGroupRule(TrafficMatch):
    """Allowed traffic, from/to CIDRs or the members of other security groups."""

    model_config = ConfigDict(json_schema_extra=rules(*TRAFFIC_MATCH_RULES))

    security_groups: t.Annotated[list[Name], Field(max_length=16)] = Field(
        default_factory=list, description="Also allow the members of these SecurityGroups (same namespace)."
    )


Rules = t.Annotated[list[SecurityGroupRule], Field(max_length=128)]


class SecurityGroupSpec(Model):
    """Desired rules. Ingress is denied and egress allowed unless rules say otherwise."""

    description: Description = Field("", description="Human-readable description.")
    ingress: Rules = Field(default_factory=list, description="Allowed ingress to members.")
    egress: Rules = Field(
        default_factory=list, description="Allowed egress from members; when empty, all egress is allowed."
    )


class SecurityGroupStatus(ResourceStatus):
    """Observed state of a security group."""

    members: int | None = Field(None, description="Number of guests in the group.")


class SecurityGroup(
    Resource,
    scope=NAMESPACED,
    short_names=["sg"],
    subresources=STATUS_SUBRESOURCE,
    printer_columns=[
        column("Members", ".status.members", "integer"),
        column("Phase", ".status.phase"),
    ],
):
    """A security group: ingress and egress rules applied on every member guest's port."""

    spec: SecurityGroupSpec = Field(default_factory=SecurityGroupSpec, description="Desired rules.")
    status: SecurityGroupStatus = Field(default_factory=SecurityGroupStatus, description="Observed state.")
