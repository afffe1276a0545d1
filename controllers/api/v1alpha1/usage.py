"""UsageRecord: metered use of one resource in one period (CloudStack's usage server records).

The controller writes one record per namespace, resource and hour: a guest's running and allocated
hours with its offering, a volume's GiB-hours, a public address's hours. Records are objects, so they
survive controller restarts and are read with ``kubectl get usagerecords -n <namespace>``; the
controller also exports their totals as Prometheus metrics.
"""

from __future__ import annotations

import datetime
import typing as t

from pydantic import Field

from .common import (
    NAMESPACED,
    STATUS_SUBRESOURCE,
    Model,
    Resource,
    ResourceStatus,
    StrEnum,
    column,
)


class UsageKind(StrEnum):
    """The kind of resource metered."""

    VIRTUAL_MACHINE = "VirtualMachine"
    VOLUME = "Volume"
    PUBLIC_IP_ADDRESS = "PublicIPAddress"


class UsageInterval(Model):
    """A stretch of time inside the period."""

    start: datetime.datetime = Field(description="Start of the stretch.")
    end: datetime.datetime = Field(description="End of the stretch (the last time it was known to last).")


class UsageRecordSpec(Model):
    """Which resource and which period the record meters (written by the controller)."""

    kind: UsageKind = Field(description="VirtualMachine, Volume or PublicIPAddress.")
    resource: t.Annotated[str, Field(max_length=253)] = Field(description="Name of the metered object.")
    resource_uid: t.Annotated[str, Field(max_length=64)] = Field(description="UID of the metered object.")
    period_start: datetime.datetime = Field(description="Start of the period (inclusive).")
    period_end: datetime.datetime = Field(description="End of the period (exclusive).")


class UsageRecordStatus(ResourceStatus):
    """Metered amounts of the period (kept current while the period runs)."""

    offering: str | None = Field(None, description="ServiceOffering of the guest, DiskOffering of the volume.")
    running_hours: float | None = Field(None, description="Hours the guest's domain ran in the period.")
    allocated_hours: float | None = Field(
        None, description="Hours the resource existed (a guest until destroyed, a volume or address until deleted)."
    )
    size_gib: float | None = Field(None, alias="sizeGiB", description="Size of the volume, in GiB.")
    gib_hours: float | None = Field(None, alias="gibHours", description="Volume size times allocated hours.")
    running: t.Annotated[list[UsageInterval], Field(max_length=512)] = Field(
        default_factory=list, description="When the guest ran, inside the period (each start from the domain's "
        "recorded start time)."
    )
    metered_until: datetime.datetime | None = Field(None, description="The amounts are complete up to here.")


class UsageRecord(
    Resource,
    scope=NAMESPACED,
    short_names=["usage"],
    subresources=STATUS_SUBRESOURCE,
    printer_columns=[
        column("Kind", ".spec.kind"),
        column("Resource", ".spec.resource"),
        column("Period", ".spec.periodStart"),
        column("Offering", ".status.offering"),
        column("Running-h", ".status.runningHours", "number"),
        column("Allocated-h", ".status.allocatedHours", "number"),
        column("GiB-h", ".status.gibHours", "number"),
        column("Phase", ".status.phase", priority=1, description="Open while the period runs, then Closed."),
    ],
):
    """Use of one resource in one hour, for billing (CloudStack's usage records)."""

    selectable_fields = (".spec.resourceUid",)

    spec: UsageRecordSpec = Field(description="The resource and the period.")
    status: UsageRecordStatus = Field(default_factory=UsageRecordStatus, description="The metered amounts.")
