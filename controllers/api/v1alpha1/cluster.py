"""Cluster: hosts of one hypervisor type that share primary storage and can migrate between each other."""

from __future__ import annotations

import typing as t

from pydantic import Field

from .common import (
    CLUSTER,
    IMMUTABLE,
    PHASE_COLUMN,
    STATUS_SUBRESOURCE,
    AllocationState,
    Capacity,
    DisplayText,
    HypervisorType,
    Model,
    Name,
    Resource,
    ResourceStatus,
    column,
)

OvercommitRatio = t.Annotated[float, Field(ge=1.0, le=16.0)]


class ClusterSpec(Model):
    """Desired state of a cluster."""

    pod: t.Annotated[Name, IMMUTABLE] = Field(description="Name of the HostPod this cluster belongs to. Immutable.")
    display_text: DisplayText = Field("", description="Human-readable description of the cluster.")
    hypervisor_type: t.Annotated[HypervisorType, IMMUTABLE] = Field(
        HypervisorType.KVM,
        description="Hypervisor of every host in the cluster: KVM (libvirt/QEMU) or Simulator. Immutable.",
    )
    allocation_state: AllocationState = Field(
        AllocationState.ENABLED, description="Disabled clusters take no new placements."
    )
    cpu_overcommit_ratio: OvercommitRatio = Field(
        1.0, description="Virtual CPUs placed per physical core (CloudStack's cpu.overprovisioning.factor)."
    )
    memory_overcommit_ratio: OvercommitRatio = Field(
        1.0, description="Guest memory placed per unit of host memory (mem.overprovisioning.factor)."
    )


class ClusterStatus(ResourceStatus):
    """Observed state of a cluster."""

    effective_allocation_state: AllocationState | None = Field(
        None, description="Enabled only when this object and every parent above it are Enabled; "
        "the planner places only where this is Enabled."
    )

    zone: str | None = Field(None, description="Zone of the cluster, from its pod.")
    capacity: Capacity | None = Field(None, description="Capacity of the cluster's Up, enabled hosts, ratios applied.")
    hosts: int | None = Field(None, description="Number of hosts in the cluster.")


class Cluster(
    Resource,
    scope=CLUSTER,
    short_names=["ccl"],
    subresources=STATUS_SUBRESOURCE,
    printer_columns=[
        column("Pod", ".spec.pod"),
        column("Hypervisor", ".spec.hypervisorType"),
        column("Allocation", ".spec.allocationState"),
        PHASE_COLUMN,
        column("Hosts", ".status.hosts", "integer"),
        column("CPU-Ratio", ".spec.cpuOvercommitRatio", "number", 1),
        column("Mem-Ratio", ".spec.memoryOvercommitRatio", "number", 1),
    ],
):
    """A cluster: hosts of one hypervisor type sharing primary storage; the unit of live migration."""

    selectable_fields = (".spec.pod",)

    spec: ClusterSpec = Field(description="Desired state of the cluster.")
    status: ClusterStatus = Field(default_factory=ClusterStatus, description="Observed state of the cluster.")
