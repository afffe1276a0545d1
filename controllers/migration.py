"""Pure parts of live migration and host maintenance (no kopf, no I/O).

A migration is one attempt through Pending → Scheduling → PreparingTarget → Migrating → Succeeded | Failed.
The functions here decide, from objects already looked up, which disks move and where, what the guest's
launch looks like on the target, which guests a host in maintenance must evacuate, and what the host's
resource state is while it does.
"""

from __future__ import annotations

import dataclasses
import typing as t

from controllers.api.v1alpha1.host import ResourceState
from controllers.api.v1alpha1.storagepool import PoolScope
from controllers.api.v1alpha1.virtualmachine import LaunchSpec
from controllers.api.v1alpha1.virtualmachinemigration import (
    ACTIVE_PHASES,
    MigrationDisk,
    MigrationPhase,
    VirtualMachineMigration,
)

PREPARE_TIMEOUT_SECONDS = 300.0
"""A target whose agent has not prepared within this time fails the migration (the guest stays put)."""

RESERVATION_SUFFIX = "@migration"
"""Ledger key of a migration's target reservation: ``<namespace>/<vm>@migration``."""


def reservation_key(vm_key: str) -> str:
    return vm_key + RESERVATION_SUFFIX


def local_volumes(volumes: t.Iterable[t.Any], pools: t.Mapping[str, t.Any]) -> list[t.Any]:
    """The guest's volumes on host-local pools: they move with it (block copy)."""
    moving = []
    for volume in volumes:
        pool = pools.get(volume.status.storage_pool or "")
        if pool is not None and pool.spec.scope == PoolScope.HOST:
            moving.append(volume)
    return moving


def target_disk_path(pool: t.Any, volume: t.Any) -> str:
    """Where a moving disk goes in the target pool: the same file name the volume would have had there."""
    return f"{pool.spec.path.rstrip('/')}/{volume.metadata.uid}.qcow2"


def migration_disks(volumes: t.Iterable[t.Any], target_pool: t.Any) -> list[MigrationDisk]:
    return [MigrationDisk(volume=v.metadata.name, source_pool=v.status.storage_pool, source_path=v.status.path,
                          target_pool=target_pool.metadata.name, target_path=target_disk_path(target_pool, v),
                          size_bytes=v.status.size_bytes or 0)
            for v in volumes]


def moved_launch(launch: LaunchSpec, target_host: str, disks: t.Iterable[MigrationDisk]) -> LaunchSpec:
    """The guest's launch as it runs on the target: same CPU, memory, NICs (MAC and IP kept); moved disks at
    their new pool and path."""
    moved = {d.volume: d for d in disks}
    new_disks = [d.model_copy(update={"pool": moved[d.volume].target_pool, "path": moved[d.volume].target_path})
                 if d.volume in moved else d for d in launch.disks]
    return launch.model_copy(update={"host": target_host, "disks": new_disks})


def active(migration: VirtualMachineMigration) -> bool:
    return (migration.status.phase or MigrationPhase.PENDING) in ACTIVE_PHASES and \
        migration.metadata.deletion_timestamp is None


# ---------------------------------------------------------------------------------------------
# Host maintenance
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Evacuation:
    """What a host in maintenance must do next, and how it stands."""

    to_migrate: tuple[tuple[str, str], ...]        # (namespace, name) of guests needing a migration object
    unmovable: tuple[tuple[str, str], ...]         # ("namespace/name", why) of guests that could not move
    moving: int                                    # migrations in progress


def evacuation(host: str, guests: t.Iterable[t.Any], migrations: t.Iterable[VirtualMachineMigration]) -> Evacuation:
    """Guests placed on ``host`` each need one migration away; a failed one makes the guest unmovable (it is
    not retried until maintenance is cancelled and asked again); one in progress is waited for."""
    latest: dict[tuple[str, str], VirtualMachineMigration] = {}
    for migration in migrations:
        key = (migration.metadata.namespace or "", migration.spec.virtual_machine.name)
        if migration.status.source_host not in (None, host):
            continue
        previous = latest.get(key)
        if previous is None or (migration.metadata.creation_timestamp or 0) >= (previous.metadata.creation_timestamp
                                                                                 or 0):
            latest[key] = migration
    to_migrate, unmovable, moving = [], [], 0
    for vm in guests:
        key = (vm.metadata.namespace or "", vm.metadata.name)
        migration = latest.get(key)
        if migration is None:
            if vm.status.migration is None:
                to_migrate.append(key)
            else:
                moving += 1  # someone else's migration is moving it
        elif active(migration):
            moving += 1
        elif migration.status.phase == MigrationPhase.FAILED:
            unmovable.append((f"{key[0]}/{key[1]}", f"{migration.status.reason}: {migration.status.message}"))
        else:
            moving += 1  # Succeeded: the placement change is on its way
    return Evacuation(tuple(sorted(to_migrate)), tuple(sorted(unmovable)), moving)


def maintenance_state(maintenance: bool, guests: int, evacuating: Evacuation | None) -> ResourceState | None:
    """PrepareForMaintenance while guests remain and can move; Maintenance once none is left; ErrorInMaintenance
    when some guest cannot move and nothing else is in flight. None when not in maintenance."""
    if not maintenance:
        return None
    if guests == 0:
        return ResourceState.MAINTENANCE
    if evacuating is not None and evacuating.unmovable and not evacuating.moving and not evacuating.to_migrate:
        return ResourceState.ERROR_IN_MAINTENANCE
    return ResourceState.PREPARE_FOR_MAINTENANCE


def evacuation_name(host: str, vm_name: str, uid: str) -> str:
    """A migration name per host and guest incarnation: one evacuation each, stable across controller restarts."""
    base = f"evacuate-{host}-{vm_name}"
    return f"{base[:240]}-{uid[:8]}"
