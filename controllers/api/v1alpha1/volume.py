"""Volume: a guest disk on primary storage (the root disk of a guest, or a data disk)."""

from __future__ import annotations

import typing as t

from pydantic import ConfigDict, Field

from .storagepool import RbdSource
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
    REVERTING = "Reverting"
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


class RevertRequest(Model):
    """Revert the volume to a snapshot of it, once per (snapshot, token): a one-shot operation kept in spec, so
    re-applying the same manifest (GitOps) does nothing more; change ``token`` to revert to the same snapshot
    again. The guest using the volume must be Stopped."""

    snapshot: Name = Field(description="A BackedUp Snapshot of this volume (same namespace).")
    token: t.Annotated[str, Field(max_length=63)] = Field(
        "", description="Any value; a new value asks for another revert to the same snapshot.")


class VolumeSpec(Model):
    """Desired state of a volume."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            Rule("!has(oldSelf.storagePool) || has(self.storagePool)",
                 "storagePool cannot be removed once set; name another pool to migrate the volume",
                 field_path=".storagePool", reason="FieldValueForbidden"),
            Rule("self.type != 'ROOT' || has(oldSelf.virtualMachine) == false || has(self.virtualMachine) && "
                 "self.virtualMachine == oldSelf.virtualMachine",
                 "a root volume stays attached to its guest", field_path=".virtualMachine"),
            Rule("has(self.sizeGiB) || has(self.diskOffering) || has(self.fromSnapshot) || self.type == 'ROOT'",
                 "give sizeGiB, a diskOffering with a size, or fromSnapshot", field_path=".sizeGiB"),
            Rule("!has(oldSelf.sizeGiB) || has(self.sizeGiB) && self.sizeGiB >= oldSelf.sizeGiB",
                 "volumes can grow but not shrink", field_path=".sizeGiB"),
            set_at_creation("diskOffering", "fromSnapshot", "fromTemplate"),
            Rule("!has(self.snapshotPolicies) || self.snapshotPolicies.all(p, "
                 "self.snapshotPolicies.filter(q, q.intervalType == p.intervalType).size() == 1)",
                 "at most one snapshot policy per interval type", field_path=".snapshotPolicies"),
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
        None, description="Pool to create the volume on; chosen by the planner when unset. Naming another pool "
        "later migrates the volume there (its guest must be Stopped): copied, verified, then switched."
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
    revert: RevertRequest | None = Field(
        None, description="Revert the disk to a snapshot (guest Stopped); done once per snapshot and token."
    )


class BaseImage(Model):
    """A template image a disk is an overlay of: copied once from the image store into the pool."""

    source: str = Field(description="Absolute path of the template image on the image store.")
    path: str = Field(description="Absolute path of the pool's cached copy, the overlay's backing file; on RBD, "
                      "image@snapshot of the pool's template image the volume is a clone of.")
    format: str = Field("qcow2", description="Format of the image: qcow2 or raw (on RBD: of the image store copy; "
                        "the pool's template image is raw).")


class RevertTarget(Model):
    """A revert handed to the agent: the image to rewrite the disk from."""

    id: str = Field(description="<snapshot uid>/<token>: the agent reports it in node.reverted when done.")
    snapshot: str = Field(description="The Snapshot.")
    source: str = Field(description="Image to copy into the disk (the snapshot's primary copy or its backup).")


class MigrationTarget(Model):
    """A storage migration in progress: the copy goes to path on storagePool, is verified, then replaces the
    source, which is removed last."""

    storage_pool: str = Field(description="Pool the volume moves to.")
    path: str = Field(description="Path of the disk on that pool.")
    host: str = Field(description="Host whose agent copies (it reaches both pools).")
    source_pool: str = Field(description="Pool the volume moves from.")
    source_path: str = Field(description="The source disk, removed once the copy is verified and in use.")
    state: str = Field(description="Copying (source in use) or CleaningUp (copy in use, source being removed).")
    rbd: RbdSource | None = Field(None, description="The target pool's Ceph access, when it is an RBD pool.")
    source_rbd: RbdSource | None = Field(None, description="The source pool's Ceph access, when it is an RBD pool.")


class DiskReport(Model):
    """The disk as the agent of its host finds it (owned by the agent)."""

    exists: bool = Field(description="The disk exists at status.path.")
    size_bytes: int | None = Field(None, description="Virtual size found.")
    physical_size_bytes: int | None = Field(None, description="Space the disk takes on the pool.")
    message: str = Field("", description="What failed, when the last operation did.")
    reverted: str | None = Field(None, description="The last revert done (status.revert.id).")
    migrated: str | None = Field(None, description="Path of a migration copy written and verified equal to the "
                                 "source.")
    source_removed: str | None = Field(None, description="Path of a migration source removed after the switch.")


class VolumeStatus(ResourceStatus):
    """Observed state of a volume. storagePool, host, path, format, sizeBytes and baseImage are the
    controller's resolved target; node is what the agent finds."""

    storage_pool: str | None = Field(None, description="Pool the volume is on.")
    host: str | None = Field(None, description="Host whose agent manages the disk (the pool's host, for local pools).")
    path: str | None = Field(None, description="Path of the disk on the pool (file path, or image name on RBD).")
    format: str | None = Field(None, description="qcow2 or raw.")
    size_bytes: int | None = Field(None, description="Virtual size.")
    base_image: BaseImage | None = Field(None, description="Template image the disk is an overlay of.")
    source_image: str | None = Field(None, description="Image the disk is made from (a snapshot backup).")
    revert: RevertTarget | None = Field(None, description="A revert for the agent to do.")
    migration: MigrationTarget | None = Field(None, description="A storage migration in progress.")
    requested_pool: str | None = Field(None, description="The spec.storagePool the current pool answers: a "
                                       "different spec.storagePool asks for a storage migration (a live "
                                       "migration may move the disk without one).")
    rbd: RbdSource | None = Field(None, description="The Ceph pool and client of an RBD volume, as the pool gives "
                                  "them (the agent reads the key from the Secret).")
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
