"""HostPod: CloudStack's pod, a rack of hosts sharing a management subnet and switch."""

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
    Name,
    Resource,
    ResourceStatus,
    address_in_cidr,
    address_range,
    column,
    rules,
)


class HostPodSpec(Model):
    """Desired state of a pod. The management range holds the addresses Cumulo gives system components."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            address_in_cidr("gateway"),
            address_in_cidr("startIp"),
            address_in_cidr("endIp"),
            address_range(),
        )
    )

    zone: t.Annotated[Name, IMMUTABLE] = Field(description="Name of the Zone this pod belongs to. Immutable.")
    display_text: DisplayText = Field("", description="Human-readable description of the pod.")
    allocation_state: AllocationState = Field(
        AllocationState.ENABLED, description="Disabled pods take no new placements."
    )
    cidr: IPv4Cidr = Field(description="The pod's management subnet, for example 192.168.10.0/24.")
    gateway: IPv4Address = Field(description="Gateway of the management subnet.")
    start_ip: IPv4Address = Field(
        alias="startIp", description="First address of the range reserved for system components in this pod."
    )
    end_ip: IPv4Address = Field(alias="endIp", description="Last address of the reserved range.")


class HostPodStatus(ResourceStatus):
    """Observed state of a pod."""

    effective_allocation_state: AllocationState | None = Field(
        None, description="Enabled only when this object and every parent above it are Enabled; "
        "the planner places only where this is Enabled."
    )

    capacity: Capacity | None = Field(None, description="Capacity summed over the pod's enabled clusters.")
    clusters: int | None = Field(None, description="Number of clusters in the pod.")


class HostPod(
    Resource,
    scope=CLUSTER,
    short_names=["hpod"],
    subresources=STATUS_SUBRESOURCE,
    printer_columns=[
        column("Zone", ".spec.zone"),
        column("CIDR", ".spec.cidr"),
        column("Allocation", ".spec.allocationState"),
        PHASE_COLUMN,
        column("Clusters", ".status.clusters", "integer"),
    ],
):
    """A pod (CloudStack's HostPod): a rack of clusters sharing a management subnet within a zone."""

    selectable_fields = (".spec.zone",)

    spec: HostPodSpec = Field(description="Desired state of the pod.")
    status: HostPodStatus = Field(default_factory=HostPodStatus, description="Observed state of the pod.")
