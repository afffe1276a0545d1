"""Quota: resource limits of a namespace (CloudStack's account/project resource limits)."""

from __future__ import annotations

import typing as t

from pydantic import ConfigDict, Field

from .common import (
    NAMESPACED,
    STATUS_SUBRESOURCE,
    Model,
    Resource,
    ResourceStatus,
    Rule,
    column,
    rules,
)

Limit = t.Annotated[int, Field(ge=0)]


class QuotaAmounts(Model):
    """Amounts of each limited resource; an unset limit means unlimited."""

    virtual_machines: Limit | None = Field(None, description="Guests, in any state but expunged.")
    cpus: Limit | None = Field(None, description="Virtual CPUs of those guests.")
    memory_mib: Limit | None = Field(None, alias="memoryMiB", description="Memory of those guests, in MiB.")
    volumes: Limit | None = Field(None, description="Volumes, root disks included.")
    primary_storage_gib: Limit | None = Field(
        None, alias="primaryStorageGiB", description="Size of those volumes, in GiB."
    )
    snapshots: Limit | None = Field(None, description="Snapshots.")
    networks: Limit | None = Field(None, description="Guest networks.")
    public_ips: Limit | None = Field(None, alias="publicIPs", description="Public IP addresses.")


class QuotaSpec(Model):
    """The namespace's limits."""

    limits: QuotaAmounts = Field(default_factory=QuotaAmounts, description="Limit of each resource.")


class QuotaStatus(ResourceStatus):
    """Observed use of the namespace."""

    used: QuotaAmounts | None = Field(None, description="What the namespace uses now.")


class Quota(
    Resource,
    scope=NAMESPACED,
    short_names=["cq"],
    subresources=STATUS_SUBRESOURCE,
    printer_columns=[
        column("VMs", ".status.used.virtualMachines", "integer"),
        column("VM-Limit", ".spec.limits.virtualMachines", "integer"),
        column("CPUs", ".status.used.cpus", "integer"),
        column("CPU-Limit", ".spec.limits.cpus", "integer"),
        column("Phase", ".status.phase"),
    ],
):
    """The resource limits of a namespace. A namespace has one Quota, named default."""

    model_config = ConfigDict(
        json_schema_extra=rules(Rule("self.metadata.name == 'default'", "a namespace has one Quota, named default")),
    )

    spec: QuotaSpec = Field(description="The limits.")
    status: QuotaStatus = Field(default_factory=QuotaStatus, description="Observed use of the namespace.")
