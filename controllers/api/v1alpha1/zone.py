"""Zone: CloudStack's availability zone, typically one data centre."""

from __future__ import annotations

import typing as t

from pydantic import ConfigDict, Field

from .common import (
    CLUSTER,
    IMMUTABLE,
    PHASE_COLUMN,
    STATUS_SUBRESOURCE,
    AllocationState,
    Capacity,
    DisplayText,
    IPv4Address,
    IPv4Cidr,
    Model,
    Resource,
    ResourceStatus,
    Rule,
    StrEnum,
    column,
    rules,
)


class NetworkType(StrEnum):
    """Basic: one flat shared network with security groups. Advanced: isolated, shared and L2 guest networks."""

    BASIC = "Basic"
    ADVANCED = "Advanced"


class AllocationAlgorithm(StrEnum):
    """How the deployment planner picks among suitable hosts (CloudStack's vm.allocation.algorithm)."""

    FIRST_FIT = "FirstFit"
    RANDOM = "Random"
    USER_DISPERSING = "UserDispersing"


class ZoneSpec(Model):
    """Desired state of a zone."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            Rule(
                "self.networkType == 'Basic' || !has(self.securityGroupsEnabled) || !self.securityGroupsEnabled",
                "security groups are the isolation of basic zones; an advanced zone isolates guests by network",
                field_path=".securityGroupsEnabled",
            ),
        )
    )

    display_text: DisplayText = Field("", description="Human-readable description of the zone.")
    network_type: t.Annotated[NetworkType, IMMUTABLE] = Field(
        description="Basic or Advanced networking. Cannot be changed once the zone exists."
    )
    allocation_state: AllocationState = Field(
        AllocationState.ENABLED, description="Disabled zones take no new placements."
    )
    dns1: IPv4Address = Field(description="First public DNS server handed to guests.")
    dns2: IPv4Address | None = Field(None, description="Second public DNS server handed to guests.")
    internal_dns1: IPv4Address | None = Field(
        None, alias="internalDns1", description="DNS server used by system components (virtual routers)."
    )
    internal_dns2: IPv4Address | None = Field(
        None, alias="internalDns2", description="Second DNS server used by system components."
    )
    guest_cidr: IPv4Cidr = Field(
        "10.1.1.0/24",
        description="Default CIDR of isolated guest networks created in this zone without their own.",
    )
    network_domain: t.Annotated[str, Field(max_length=253, pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?\.)*[a-z0-9]([-a-z0-9]*[a-z0-9])?$")] | None = Field(
        None, description="DNS domain appended to guest host names, for example cloud.internal."
    )
    local_storage_enabled: bool = Field(
        True, description="Whether host-local primary storage may be used for guest disks in this zone."
    )
    security_groups_enabled: bool | None = Field(
        None, description="Basic zones only: enforce security groups on guest traffic (defaults to true there)."
    )
    allocation_algorithm: AllocationAlgorithm = Field(
        AllocationAlgorithm.FIRST_FIT, description="How the planner chooses among suitable hosts."
    )


class ZoneStatus(ResourceStatus):
    """Observed state of a zone."""

    capacity: Capacity | None = Field(None, description="Capacity summed over the zone's enabled pods.")
    pods: int | None = Field(None, description="Number of pods in the zone.")
    hosts: int | None = Field(None, description="Number of hosts in the zone.")


class Zone(
    Resource,
    scope=CLUSTER,
    short_names=["zn"],
    subresources=STATUS_SUBRESOURCE,
    printer_columns=[
        column("Network", ".spec.networkType"),
        column("Allocation", ".spec.allocationState"),
        PHASE_COLUMN,
        column("Hosts", ".status.hosts", "integer"),
        column("CPU", ".status.capacity.cpuCores.allocated", "integer", 1, "Allocated vCPUs"),
        column("Memory-MiB", ".status.capacity.memoryMiB.allocated", "integer", 1, "Allocated memory"),
    ],
):
    """A zone: one data centre with its own pods, primary and secondary storage and physical networks."""

    spec: ZoneSpec = Field(description="Desired state of the zone.")
    status: ZoneStatus = Field(default_factory=ZoneStatus, description="Observed state of the zone.")

