"""Volume: a guest disk on primary storage (the root disk of a guest, or a data disk)."""

from __future__ import annotations

import typing as t

from pydantic import ConfigDict, Field

from .common import (
    IMMUTABLE,
    NAMESPACED,
    STATUS_SUBRESOURCE,
    DisplayText,
    Model,
    Name,
    NamespacedReference,
    ObjectReference,
    Resource,
    ResourceStatus,
    Rule,
    StrEnum,
    column,
    rules,
    set_at_creation,
)


class VolumeType(StrEnum):
    ROOT = "ROOT"
    DATADISK = "DATADISK"


class VolumePhase(StrEnum):
    ALLOCATED = "Allocated"
    CREATING = "Creating"
    READY = "Ready"
    ATTACHED = "Attached"
    MIGRATING = "Migrating"
    DESTROYED = "Destroyed"
    EXPUNGED = "Expunged"
    ERROR = "Error"


class IntervalType(StrEnum):
    HOURLY = "Hourly"
    DAILY = "Daily"
    WEEKLY = "Weekly"
    MONTHLY = "Monthly"


class SnapshotPolicy(Model):
    """A recurring snapshot schedule and how many of its snapshots to keep (CloudStack's snapshot policy)."""

    interval_type: IntervalType = Field(description="Hourly, Daily, Weekly or Monthly.")
    schedule: t.Annotated[str, Field(max_length=32, pattern=r"^[0-9:]+$")] = Field(
        description="When in the interval: MM for Hourly, HH:MM for Daily, HH:MM:D(1-7) for Weekly, "
        "HH:MM:DD for Monthly, as CloudStack."
    )
    timezone: t.Annotated[str, Field(max_length=64)] = Field("UTC", description="IANA time zone of the schedule.")
    max_snapshots: t.Annotated[int, Field(ge=1, le=1024)] = Field(
        description="How many snapshots of this policy to keep; older ones are deleted."
    )


class VolumeSpec(Model):
    """Desired state of a volume."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            Rule("!has(oldSelf.storagePool) || has(self.storagePool) && self.storagePool == oldSelf.storagePool",
                 "storagePool cannot change once set; migrate the volume instead", field_path=".storagePool",
                 reason="FieldValueForbidden"),
            Rule("self.type != 'ROOT' || has(oldSelf.virtualMachine) == false || has(self.virtualMachine) && "
                 "self.virtualMachine == oldSelf.virtualMachine",
                 "a root volume stays attached to its guest", field_path=".virtualMachine"),
            Rule("has(self.sizeGiB) || has(self.diskOffering) || has(self.fromSnapshot) || self.type == 'ROOT'",
                 "give sizeGiB, a diskOffering with a size, or fromSnapshot", field_path=".sizeGiB"),
            Rule("!has(oldSelf.sizeGiB) || has(self.sizeGiB) && self.sizeGiB >= oldSelf.sizeGiB",
                 "volumes can grow but not shrink", field_path=".sizeGiB"),
            set_at_creation("diskOffering", "fromSnapshot", "fromTemplate"),
        )
    )

    display_text: DisplayText = Field("", description="Human-readable description.")
    type: t.Annotated[VolumeType, IMMUTABLE] = Field(
        VolumeType.DATADISK, description="DATADISK, or ROOT for a guest's root disk (made by the controller)."
    )
    disk_offering: t.Annotated[Name, IMMUTABLE] | None = Field(
        None, description="DiskOffering giving size, storage type and limits. Immutable."
    )
    size_gib: t.Annotated[int, Field(ge=1, le=65536)] | None = Field(
        None, alias="sizeGiB", description="Size in GiB, for customized offerings or to grow the volume."
    )
    zone: t.Annotated[Name, IMMUTABLE] = Field(description="Zone of the volume. Immutable.")
    storage_pool: Name | None = Field(
        None, description="Pool to create the volume on; chosen by the planner when unset. Fixed once set."
    )
    from_snapshot: t.Annotated[ObjectReference, IMMUTABLE] | None = Field(
        None, description="Create the volume from this Snapshot. Immutable."
    )
    from_template: t.Annotated[NamespacedReference, IMMUTABLE] | None = Field(
        None, description="Root volumes: the Template the disk is a copy-on-write overlay of. Immutable."
    )
    virtual_machine: ObjectReference | None = Field(
        None, description="Attach the volume to this VirtualMachine (same namespace), also while it runs; "
        "remove to detach. Root volumes are attached by the controller."
    )
    snapshot_policies: t.Annotated[list[SnapshotPolicy], Field(max_length=4)] = Field(
        default_factory=list, description="Recurring snapshot schedules with retention."
    )


class BaseImage(Model):
    """A template image a disk is an overlay of: copied once from the image store into the pool."""

    source: str = Field(description="Absolute path of the template image on the image store.")
    path: str = Field(description="Absolute path of the pool's cached copy, the overlay's backing file.")
    format: str = Field("qcow2", description="Format of the image: qcow2 or raw.")


class DiskReport(Model):
    """The disk as the agent of its host finds it (owned by the agent)."""

    exists: bool = Field(description="The disk exists at status.path.")
    size_bytes: int | None = Field(None, description="Virtual size found.")
    physical_size_bytes: int | None = Field(None, description="Space the disk takes on the pool.")
    message: str = Field("", description="What failed, when the last operation did.")


class VolumeStatus(ResourceStatus):
    """Observed state of a volume. storagePool, host, path, format, sizeBytes and baseImage are the
    controller's resolved target; node is what the agent finds."""

    storage_pool: str | None = Field(None, description="Pool the volume is on.")
    host: str | None = Field(None, description="Host whose agent manages the disk (the pool's host, for local pools).")
    path: str | None = Field(None, description="Path of the disk on the pool (file path, or image name on RBD).")
    format: str | None = Field(None, description="qcow2 or raw.")
    size_bytes: int | None = Field(None, description="Virtual size.")
    base_image: BaseImage | None = Field(None, description="Template image the disk is an overlay of.")
    physical_size_bytes: int | None = Field(None, description="Space used on the pool.")
    attached_to: str | None = Field(None, description="VirtualMachine the volume is attached to.")
    device_id: int | None = Field(None, description="Device position in that guest.")
    node: DiskReport | None = Field(None, description="What the host agent finds.")


class Volume(
    Resource,
    scope=NAMESPACED,
    short_names=["vol"],
    subresources=STATUS_SUBRESOURCE,
    printer_columns=[
        column("Phase", ".status.phase"),
        column("Type", ".spec.type"),
        column("Size", ".status.sizeBytes", "integer"),
        column("Pool", ".status.storagePool"),
        column("Attached-To", ".status.attachedTo"),
    ],
):
    """A volume: a guest disk on primary storage."""

    selectable_fields = (".spec.zone", ".spec.diskOffering", ".status.storagePool", ".spec.virtualMachine.name")

    spec: VolumeSpec = Field(description="Desired state of the volume.")
    status: VolumeStatus = Field(default_factory=VolumeStatus, description="Observed state of the volume.")
