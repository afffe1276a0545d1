"""ServiceOffering: the compute size of a guest (CPU, memory), where its root disk lives, and HA."""

from __future__ import annotations

import typing as t

from pydantic import Field

from .common import (
    CLUSTER,
    PHASE_COLUMN,
    STATUS_SUBRESOURCE,
    DisplayText,
    Model,
    Resource,
    ResourceStatus,
    StorageType,
    Tags,
    column,
)


class ServiceOfferingSpec(Model):
    """What a guest of this offering gets."""

    display_text: DisplayText = Field("", description="Human-readable description shown to users.")
    cpu_number: t.Annotated[int, Field(ge=1, le=256)] = Field(description="Number of virtual CPUs.")
    cpu_speed_mhz: t.Annotated[int, Field(ge=1)] = Field(
        1000, alias="cpuSpeedMHz", description="Speed of each virtual CPU in MHz (a share weight, as in CloudStack)."
    )
    memory_mib: t.Annotated[int, Field(ge=32, le=4194304)] = Field(
        alias="memoryMiB", description="Guest memory in MiB."
    )
    storage_type: StorageType = Field(
        StorageType.SHARED, description="Put the root disk on host-local storage (local) or shared storage (shared)."
    )
    root_disk_size_gib: t.Annotated[int, Field(ge=1)] | None = Field(
        None, alias="rootDiskSizeGiB", description="Root disk size; defaults to the template's virtual size."
    )
    host_tags: Tags = Field(default_factory=list, description="Guests only go to hosts carrying all these tags.")
    storage_tags: Tags = Field(
        default_factory=list, description="Root disks only go to pools carrying all these tags."
    )
    offer_ha: bool = Field(False, alias="offerHA", description="Restart guests elsewhere when their host fails.")
    limit_cpu_use: bool = Field(
        False, description="Cap guests at their CPU speed instead of letting them use idle host CPU."
    )
    network_rate_mbps: t.Annotated[int, Field(ge=1)] | None = Field(
        None, description="Limit of each guest NIC in megabits per second; unlimited when unset."
    )
    enabled: bool = Field(True, description="Disabled offerings cannot be used for new guests.")


class ServiceOfferingStatus(ResourceStatus):
    """Observed state of a service offering."""

    virtual_machines: int | None = Field(None, description="Number of guests using the offering.")


class ServiceOffering(
    Resource,
    scope=CLUSTER,
    short_names=["so"],
    subresources=STATUS_SUBRESOURCE,
    printer_columns=[
        column("CPUs", ".spec.cpuNumber", "integer"),
        column("Memory-MiB", ".spec.memoryMiB", "integer"),
        column("Storage", ".spec.storageType"),
        column("HA", ".spec.offerHA", "boolean"),
        column("Enabled", ".spec.enabled", "boolean"),
        column("VMs", ".status.virtualMachines", "integer", 1),
        PHASE_COLUMN,
    ],
):
    """A service offering: the CPU, memory, storage type and HA a guest gets."""

    spec: ServiceOfferingSpec = Field(description="What a guest of this offering gets.")
    status: ServiceOfferingStatus = Field(
        default_factory=ServiceOfferingStatus, description="Observed state of the offering."
    )
