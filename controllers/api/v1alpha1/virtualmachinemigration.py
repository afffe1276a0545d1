"""VirtualMachineMigration: a request to live-migrate a running guest to another host (CloudStack's
migrateVirtualMachine / migrateVirtualMachineWithVolume, KubeVirt's VirtualMachineInstanceMigration).

One object is one attempt: it runs Pending → Scheduling → PreparingTarget → Migrating → Succeeded | Failed and
then stays as the record of the move (delete it when no longer wanted; a new attempt is a new object). The
controller reserves the guest's CPU and memory on the target (recorded in the guest's ``status.migration``, so
the capacity ledger rebuilt on a restart holds it too) before any agent acts; the target's agent implements the
NICs' segments and security groups and, for guests on local storage, pre-creates the disks in a local pool of
the target; the source's agent then runs the hypervisor's live migration (memory only on shared storage, with
block copy of the disks on local storage). Success moves the placement (and the volumes) to the target and
releases the source; failure leaves the guest running on the source and releases the target.

The agent acting on it is named by the ``cumulo.io/host`` label: the target's while it prepares (or cleans
up after a failure), the source's while it migrates (and removes the source copies of copied disks after a
success). That agent reports under ``status.node``.
"""

from __future__ import annotations

import datetime
import typing as t

from pydantic import Field

from .common import (
    IMMUTABLE,
    NAMESPACED,
    STATUS_SUBRESOURCE,
    Model,
    Name,
    ObjectReference,
    Resource,
    ResourceStatus,
    StrEnum,
    column,
)

EVACUATION_LABEL = "cumulo.io/evacuating"
"""Label on the migrations the controller creates to empty a host put into maintenance (value: the host)."""


class MigrationPhase(StrEnum):
    """Steps of a live migration."""

    PENDING = "Pending"
    SCHEDULING = "Scheduling"
    PREPARING_TARGET = "PreparingTarget"
    MIGRATING = "Migrating"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


ACTIVE_PHASES = frozenset({MigrationPhase.PENDING, MigrationPhase.SCHEDULING, MigrationPhase.PREPARING_TARGET,
                           MigrationPhase.MIGRATING})


class VirtualMachineMigrationSpec(Model):
    """What to move, and optionally where."""

    virtual_machine: t.Annotated[ObjectReference, IMMUTABLE] = Field(
        description="The VirtualMachine (same namespace) to move; it must be Running. Immutable.")
    host: t.Annotated[Name, IMMUTABLE] | None = Field(
        None, description="Target Host; when unset the planner chooses one in the guest's cluster (capacity, host "
        "tags, affinity groups). Immutable.")


class MigrationDisk(Model):
    """A disk that moves with the guest (local storage: block copy into a pool of the target)."""

    volume: str = Field(description="Name of the Volume.")
    source_pool: str = Field(description="StoragePool the disk is in now.")
    source_path: str = Field(description="Path of the disk now.")
    target_pool: str = Field(description="StoragePool of the target it moves to.")
    target_path: str = Field(description="Path of the disk on the target.")
    size_bytes: int = Field(description="Virtual size: the target disk is created this big before the copy.")


class MigrationPlan(Model):
    """Everything the agents need, resolved by the controller (DESIGN.md §3)."""

    source_host: str = Field(description="Host the guest runs on.")
    target_host: str = Field(description="Host it moves to.")
    target_address: str | None = Field(None, description="Address the target's hypervisor is reached at "
                                       "(the target Host's status.node.privateIp).")
    vm_uid: str = Field(description="uid of the VirtualMachine (the domain's UUID).")
    disks: list[MigrationDisk] = Field(default_factory=list, description="Disks copied to the target (local "
                                       "storage); empty for memory-only migration on shared storage.")


class MigrationReport(Model):
    """What the acting agent reports (owned by the agent)."""

    host: str | None = Field(None, description="Host of the agent that wrote this report.")
    step: str | None = Field(None, description="PreparingTarget, Migrating or CleaningUp: what it reports on.")
    done: bool = Field(False, description="The step finished (see succeeded).")
    succeeded: bool = Field(False, description="The step succeeded.")
    message: str = Field("", description="Why it failed, in the hypervisor's words.")
    console_log: str | None = Field(None, description="Target: the console log file prepared for the guest.")
    config_drive: str | None = Field(None, description="Target: the config drive prepared for the guest.")
    seconds: float | None = Field(None, description="Source: how long the hypervisor's migration took.")
    verify: bool = Field(False, description="Source: the domain left this host with no outcome known (the agent "
                         "restarted meanwhile); the target's agent is asked where it runs.")


class VirtualMachineMigrationStatus(ResourceStatus):
    """Progress of the move."""

    source_host: str | None = Field(None, description="Host the guest ran on when the migration started.")
    target_host: str | None = Field(None, description="Host chosen (or given) as the target.")
    plan: MigrationPlan | None = Field(None, description="The resolved hand-off to the agents.")
    started_at: datetime.datetime | None = Field(None, description="When the migration was accepted.")
    migration_started_at: datetime.datetime | None = Field(None, description="When the source began to migrate.")
    completed_at: datetime.datetime | None = Field(None, description="When it reached Succeeded or Failed.")
    reason: str | None = Field(None, description="Why it failed (a condition reason), when Failed.")
    message: str = Field("", description="What happened, in words.")
    verifying: bool = Field(False, description="Migrating: the target's agent is asked whether the domain runs "
                            "there (the source's agent restarted mid-migration and found it gone).")
    cleaned_up: bool = Field(False, description="What is left to remove is gone: after a failure the disks prepared "
                             "on the target, after a success the source copies of the copied disks.")
    node: MigrationReport | None = Field(None, description="What the acting agent reports.")


class VirtualMachineMigration(
    Resource,
    scope=NAMESPACED,
    short_names=["vmm", "vmim"],
    subresources=STATUS_SUBRESOURCE,
    printer_columns=[
        column("VM", ".spec.virtualMachine.name"),
        column("Phase", ".status.phase"),
        column("Source", ".status.sourceHost"),
        column("Target", ".status.targetHost"),
        column("Reason", ".status.reason", priority=1),
    ],
):
    """A live migration of a running guest to another host."""

    spec: VirtualMachineMigrationSpec = Field(description="What to move, and where.")
    status: VirtualMachineMigrationStatus = Field(default_factory=VirtualMachineMigrationStatus,
                                                  description="Progress of the move.")
