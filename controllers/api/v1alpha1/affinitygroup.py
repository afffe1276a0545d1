"""AffinityGroup: keep member guests on one host, or on different hosts."""

from __future__ import annotations

import typing as t

from pydantic import Field

from .common import (
    IMMUTABLE,
    NAMESPACED,
    STATUS_SUBRESOURCE,
    Description,
    Model,
    Resource,
    ResourceStatus,
    StrEnum,
    column,
)


class AffinityType(StrEnum):
    """CloudStack's affinity group types; the non-strict ones are preferences the planner may break."""

    HOST_AFFINITY = "HostAffinity"
    HOST_ANTI_AFFINITY = "HostAntiAffinity"
    NON_STRICT_HOST_AFFINITY = "NonStrictHostAffinity"
    NON_STRICT_HOST_ANTI_AFFINITY = "NonStrictHostAntiAffinity"


class AffinityGroupSpec(Model):
    """The group's rule."""

    type: t.Annotated[AffinityType, IMMUTABLE] = Field(
        description="HostAffinity, HostAntiAffinity, or their NonStrict preferences. Immutable."
    )
    description: Description = Field("", description="Human-readable description.")


class AffinityGroupStatus(ResourceStatus):
    """Observed state of an affinity group."""

    members: list[str] = Field(default_factory=list, description="Guests in the group.")
    hosts: list[str] = Field(default_factory=list, description="Hosts the members run on.")


class AffinityGroup(
    Resource,
    scope=NAMESPACED,
    short_names=["ag"],
    subresources=STATUS_SUBRESOURCE,
    printer_columns=[column("Type", ".spec.type"), column("Phase", ".status.phase")],
):
    """An affinity group: members run together on one host, or apart on different hosts."""

    spec: AffinityGroupSpec = Field(description="The group's rule.")
    status: AffinityGroupStatus = Field(default_factory=AffinityGroupStatus, description="Observed state.")
