"""Snapshot: a point-in-time copy of a volume, taken on primary storage and backed up to the image store."""

from __future__ import annotations

import datetime
import typing as t

from pydantic import Field

from .common import (
    IMMUTABLE,
    NAMESPACED,
    STATUS_SUBRESOURCE,
    DisplayText,
    Model,
    ObjectReference,
    Resource,
    ResourceStatus,
    StrEnum,
    column,
)


POLICY_LABEL = "cumulo.io/snapshot-policy"
"""On Snapshots a Volume's snapshot policy made: the policy's interval type (Hourly, Daily, Weekly, Monthly; a
volume has at most one policy of each)."""


class SnapshotPhase(StrEnum):
    CREATING = "Creating"
    BACKING_UP = "BackingUp"
    BACKED_UP = "BackedUp"
    ERROR = "Error"


class SnapshotCopy(Model):
    """Where one copy of the snapshot lives."""

    store: str = Field(description="StoragePool (primary) or ImageStore (secondary) holding the copy.")
    path: str = Field(description="Path or RBD snapshot name of the copy.")


class SnapshotSpec(Model):
    """Which volume to snapshot."""

    volume: t.Annotated[ObjectReference, IMMUTABLE] = Field(description="The Volume (same namespace). Immutable.")
    display_text: DisplayText = Field("", description="Human-readable description.")
    keep_on_primary: bool = Field(
        False, description="Keep the primary-storage copy after the backup (faster revert, uses pool space)."
    )


class SnapshotReport(Model):
    """What the agent taking, backing up and removing the snapshot did (owned by the agent)."""

    taken: bool = Field(False, description="The primary copy was taken (status.primary.path exists).")
    backed_up: bool = Field(False, description="The backup was written to status.secondary.path.")
    primary_removed: bool = Field(False, description="The primary copy was removed (keepOnPrimary is false).")
    deleted: bool = Field(False, description="Both copies were removed (the Snapshot is being deleted).")
    live: bool | None = Field(None, description="Taken from a running guest through the hypervisor.")
    size_bytes: int | None = Field(None, description="Virtual size of the disk when taken.")
    physical_size_bytes: int | None = Field(None, description="Size of the backup file.")
    taken_at: datetime.datetime | None = Field(None, description="When the primary copy was taken.")
    message: str = Field("", description="What failed, when the last operation did.")


class SnapshotStatus(ResourceStatus):
    """Observed state of a snapshot. host, primary and secondary are the controller's resolved target; node is
    what the agent did."""

    primary: SnapshotCopy | None = Field(None, description="The copy on primary storage.")
    secondary: SnapshotCopy | None = Field(None, description="The backup on the image store.")
    size_bytes: int | None = Field(None, description="Virtual size of the volume when taken.")
    physical_size_bytes: int | None = Field(None, description="Size of the backup.")
    taken_at: datetime.datetime | None = Field(None, description="When the snapshot was taken.")
    policy: str | None = Field(None, description="Snapshot policy that made it, if any.")
    zone: str | None = Field(None, description="Zone of the volume (and of the backup's image store).")
    host: str | None = Field(None, description="Host whose agent takes, backs up and removes the copies.")
    disk: str | None = Field(None, description="The volume's disk the snapshot is taken of.")
    node: SnapshotReport | None = Field(None, description="What the agent did.")


class Snapshot(
    Resource,
    scope=NAMESPACED,
    short_names=["snap"],
    subresources=STATUS_SUBRESOURCE,
    printer_columns=[
        column("Volume", ".spec.volume.name"),
        column("Phase", ".status.phase"),
        column("Size", ".status.physicalSizeBytes", "integer"),
        column("Taken", ".status.takenAt", "date"),
    ],
):
    """A volume snapshot, backed up to the zone's image store."""

    selectable_fields = (".spec.volume.name",)

    spec: SnapshotSpec = Field(description="Which volume to snapshot.")
    status: SnapshotStatus = Field(default_factory=SnapshotStatus, description="Observed state of the snapshot.")
