"""StoragePool: CloudStack's primary storage, where guest disks live."""

from __future__ import annotations

import datetime
import typing as t

from pydantic import ConfigDict, Field

from .common import (
    CLUSTER,
    IMMUTABLE,
    PHASE_COLUMN,
    STATUS_SUBRESOURCE,
    DisplayText,
    Model,
    Name,
    Resource,
    ResourceStatus,
    Rule,
    SecretKeyReference,
    StrEnum,
    Tags,
    column,
    rules,
)


class PoolScope(StrEnum):
    """Who can reach the pool: one host, every host of a cluster, or every host of a zone."""

    HOST = "Host"
    CLUSTER = "Cluster"
    ZONE = "Zone"


class PoolType(StrEnum):
    """Filesystem: a directory on one host (local storage). SharedMountPoint: a path mounted alike on every
    host of the scope. RBD: a Ceph pool."""

    FILESYSTEM = "Filesystem"
    SHARED_MOUNT_POINT = "SharedMountPoint"
    RBD = "RBD"


class PoolState(StrEnum):
    UP = "Up"
    DISABLED = "Disabled"
    MAINTENANCE = "Maintenance"
    ERROR = "Error"


AbsolutePath = t.Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^/")]


class RbdSource(Model):
    """Where a Ceph RBD pool is and how to authenticate to it."""

    monitors: t.Annotated[list[t.Annotated[str, Field(max_length=255)]], Field(min_length=1, max_length=16)] = Field(
        description="Ceph monitor addresses, host:port."
    )
    pool: t.Annotated[str, Field(min_length=1, max_length=255)] = Field(description="Name of the Ceph pool.")
    user: t.Annotated[str, Field(min_length=1, max_length=255)] = Field(
        "admin", description="Ceph client name without the 'client.' prefix."
    )
    secret_ref: SecretKeyReference = Field(description="Secret key holding the Ceph client's key.")


class StoragePoolSpec(Model):
    """Desired state of a primary storage pool."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            Rule("self.scope != 'Host' || has(self.host)", "a Host-scoped pool names its host", field_path=".host"),
            Rule(
                "self.scope != 'Cluster' || has(self.cluster)",
                "a Cluster-scoped pool names its cluster",
                field_path=".cluster",
            ),
            Rule("self.type != 'Filesystem' || self.scope == 'Host'", "a Filesystem pool is local: its scope is Host",
                 field_path=".scope"),
            Rule("self.type != 'RBD' || self.scope != 'Host'", "an RBD pool is shared: its scope is Cluster or Zone",
                 field_path=".scope"),
            Rule("self.type == 'RBD' ? has(self.rbd) : has(self.path)",
                 "RBD pools need rbd; Filesystem and SharedMountPoint pools need path"),
            Rule("self.type == 'RBD' || !has(self.rbd)", "rbd is only for pools of type RBD", field_path=".rbd"),
            Rule("self.scope == 'Host' || !has(self.host)", "host is only for Host-scoped pools", field_path=".host"),
            Rule("self.scope == 'Cluster' || !has(self.cluster)", "cluster is only for Cluster-scoped pools",
                 field_path=".cluster"),
        )
    )

    zone: t.Annotated[Name, IMMUTABLE] = Field(description="Zone of the pool. Immutable.")
    scope: t.Annotated[PoolScope, IMMUTABLE] = Field(description="Host, Cluster or Zone. Immutable.")
    type: t.Annotated[PoolType, IMMUTABLE] = Field(description="Filesystem, SharedMountPoint or RBD. Immutable.")
    display_text: DisplayText = Field("", description="Human-readable description of the pool.")
    host: t.Annotated[Name, IMMUTABLE] | None = Field(None, description="The host, for Host-scoped pools.")
    cluster: t.Annotated[Name, IMMUTABLE] | None = Field(None, description="The cluster, for Cluster-scoped pools.")
    path: t.Annotated[AbsolutePath, IMMUTABLE] | None = Field(
        None, description="Directory on the host(s) holding the disks, for Filesystem and SharedMountPoint pools."
    )
    rbd: RbdSource | None = Field(None, description="The Ceph pool, for RBD pools.")
    tags: Tags = Field(default_factory=list, description="Storage tags matched against offerings' storage tags.")
    overprovisioning_factor: t.Annotated[float, Field(ge=1.0, le=100.0)] = Field(
        1.0, description="Allocated size allowed per byte of capacity (storage.overprovisioning.factor), "
        "for thin-provisioned disks."
    )
    capacity_gib: t.Annotated[int, Field(ge=1)] | None = Field(
        None, alias="capacityGiB",
        description="Capacity to account for; when unset the agent reports the filesystem's or Ceph's own size.",
    )
    enabled: bool = Field(True, description="Disabled pools take no new volumes.")


class PoolHostAccess(Model):
    """Whether one host can use the pool, from that host agent's report (written by the controller)."""

    reachable: bool = Field(description="Whether the host can read and write the pool.")
    message: str = Field("", description="Why not, when unreachable.")
    checked_at: datetime.datetime | None = Field(None, description="When the agent last checked.")


class StoragePoolStatus(ResourceStatus):
    """Observed state of a pool."""

    state: PoolState | None = Field(None, description="Up, Disabled, Maintenance or Error.")
    capacity_bytes: int | None = Field(None, description="Physical capacity, in bytes.")
    used_bytes: int | None = Field(None, description="Physical space in use, in bytes.")
    allocated_bytes: int | None = Field(None, description="Sum of the virtual sizes of the volumes on the pool.")
    volumes: int | None = Field(None, description="Number of volumes on the pool.")
    host_access: dict[str, PoolHostAccess] = Field(
        default_factory=dict, description="Reachability of the pool from each host that may use it, by host name."
    )


class StoragePool(
    Resource,
    scope=CLUSTER,
    short_names=["sp"],
    subresources=STATUS_SUBRESOURCE,
    printer_columns=[
        column("Type", ".spec.type"),
        column("Scope", ".spec.scope"),
        column("Zone", ".spec.zone"),
        column("State", ".status.state"),
        PHASE_COLUMN,
        column("Volumes", ".status.volumes", "integer", 1),
        column("Allocated", ".status.allocatedBytes", "integer", 1),
        column("Capacity", ".status.capacityBytes", "integer", 1),
    ],
):
    """A primary storage pool holding guest root and data disks."""

    selectable_fields = (".spec.zone", ".spec.scope", ".spec.cluster", ".spec.host")

    spec: StoragePoolSpec = Field(description="Desired state of the pool.")
    status: StoragePoolStatus = Field(default_factory=StoragePoolStatus, description="Observed state of the pool.")
