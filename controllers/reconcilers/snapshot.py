"""Snapshot reconciler: Creating → BackingUp → BackedUp | Error (CloudStack's snapshot states).

The controller resolves where the copies go before any agent acts: the host whose agent takes it (the
volume's), the volume's disk, the primary copy's path on the volume's pool and the backup's path on the
zone's ImageStore; then it labels the Snapshot with that host. The agent reports what it did under
``status.node`` and the phase follows from that report. Deleting a Snapshot waits for the agent to remove
both copies. A Snapshot outlives its volume (CloudStack keeps backed-up snapshots): the backup stays usable
for new volumes and templates.
"""

from __future__ import annotations

from controllers import inventory, kinds
from controllers.api.v1alpha1 import Snapshot
from controllers.api.v1alpha1.host import HOST_LABEL
from controllers.api.v1alpha1.storagepool import PoolType
from controllers.api.v1alpha1.snapshot import POLICY_LABEL, SnapshotCopy, SnapshotPhase, SnapshotStatus
from controllers.conditions import Check, first_failure
from controllers.reconcilers.base import InventoryReconciler


def primary_path(pool_path: str, snapshot: Snapshot) -> str:
    return f"{pool_path.rstrip('/')}/snapshots/{snapshot.metadata.uid}.qcow2"


def rbd_primary(image: str, snapshot: Snapshot) -> str:
    """An RBD volume's primary copy: a snapshot of its image (``rbd snap create``; crash-consistent when the guest
    runs)."""
    return f"{image}@snapshot-{snapshot.metadata.uid}"


def backup_path(store_path: str, snapshot: Snapshot) -> str:
    meta = snapshot.metadata
    return f"{store_path.rstrip('/')}/snapshots/{meta.namespace}/{snapshot.spec.volume.name}/" \
           f"{meta.name}-{meta.uid[:8]}.qcow2"


def backed_up(snapshot) -> bool:
    return snapshot is not None and snapshot.status.phase == SnapshotPhase.BACKED_UP.value \
        and snapshot.status.secondary is not None and snapshot.metadata.deletion_timestamp is None


class SnapshotReconciler(InventoryReconciler):
    kind = kinds.SNAPSHOTS
    agent_status_keys = ("node",)
    progress_reasons = frozenset({"Creating", "BackingUp"})

    def setup(self) -> None:
        super().setup()
        self.index("snapshots", ".spec.volume.name",
                   lambda s: [f"{s.metadata.namespace}/{s.spec.volume.name}"])
        self.index("imagestores", ".spec.zone", lambda store: [store.spec.zone])

    def watch_map(self):
        def of_volume(volume):
            return [self.key(s.metadata.name, s.metadata.namespace) for s in
                    self.store.by("snapshots", ".spec.volume.name", f"{volume.metadata.namespace}/{volume.metadata.name}")]

        def waiting(_store):
            return [self.key(s.metadata.name, s.metadata.namespace) for s in self.store.list("snapshots")
                    if s.status.host is None]

        return {"volumes": of_volume, "imagestores": waiting}

    def _target(self, snapshot: Snapshot, status: SnapshotStatus) -> Check:
        """Resolve host, disk and both paths once; they stay fixed afterwards (the agent may be writing them)."""
        volume = self.store.get("volumes", snapshot.spec.volume.name, snapshot.metadata.namespace)
        if volume is None:
            return Check.failed("VolumeNotFound", f"Volume {snapshot.spec.volume.name} does not exist")
        node = volume.status.node
        if not volume.status.path or not volume.status.host or node is None or not node.exists:
            return Check.failed("VolumeNotReady", f"Volume {volume.metadata.name} has no disk yet")
        if volume.status.migration is not None or volume.status.revert is not None:
            return Check.failed("VolumeBusy", f"Volume {volume.metadata.name} is being migrated or reverted")
        pool = self.store.get("storagepools", volume.status.storage_pool)
        if pool is None:
            return Check.failed("NoPool", f"StoragePool {volume.status.storage_pool} does not exist")
        if not pool.spec.path and pool.spec.type != PoolType.RBD:
            return Check.failed("PoolTypeNotSupported", f"snapshots of {pool.spec.type.value} volumes are not "
                                "supported yet")
        stores = [s for s in self.store.by("imagestores", ".spec.zone", volume.spec.zone) if not s.spec.read_only]
        if not stores:
            return Check.failed("NoImageStore", f"zone {volume.spec.zone} has no writable ImageStore")
        store = next((s for s in stores if s.status.phase == "Ready"), stores[0])
        status.zone, status.host, status.disk = volume.spec.zone, volume.status.host, volume.status.path
        primary = rbd_primary(volume.status.path, snapshot) if pool.spec.type == PoolType.RBD else \
            primary_path(pool.spec.path, snapshot)
        status.primary = SnapshotCopy(store=pool.metadata.name, path=primary)
        status.secondary = SnapshotCopy(store=store.metadata.name, path=backup_path(store.spec.path, snapshot))
        return Check.passed()

    def derive(self, snapshot: Snapshot, ctx: inventory.Context) -> SnapshotStatus:
        previous = snapshot.status
        status = previous.model_copy(deep=True)
        status.observed_generation = snapshot.metadata.generation
        status.policy = snapshot.metadata.labels.get(POLICY_LABEL)
        node = previous.node
        if status.host is None and not ctx.deleting:
            target = self._target(snapshot, status)
        else:
            target = Check.passed()
        if node is not None:
            status.size_bytes = node.size_bytes
            status.physical_size_bytes = node.physical_size_bytes
            status.taken_at = node.taken_at
            if node.primary_removed or node.deleted:
                status.primary = None
            if node.deleted:
                status.secondary = None
        if not target.ok:
            ready = target
            phase = SnapshotPhase.ERROR if target.reason == "VolumeNotFound" else SnapshotPhase.CREATING
        elif node is not None and node.message:
            ready, phase = Check.failed("SnapshotFailed", node.message), SnapshotPhase.ERROR
        elif node is None or not node.taken:
            ready = Check.failed("Creating", f"the agent of {status.host} is taking the snapshot")
            phase = SnapshotPhase.CREATING
        elif not node.backed_up:
            ready = Check.failed("BackingUp", f"backing up to ImageStore {status.secondary.store if status.secondary else ''}")
            phase = SnapshotPhase.BACKING_UP
        else:
            ready = Check.passed("BackedUp", f"backed up to ImageStore {status.secondary.store if status.secondary else ''}")
            phase = SnapshotPhase.BACKED_UP
        status.phase = "Deleting" if ctx.deleting else phase.value
        status.conditions = inventory.conditions(previous.conditions, snapshot.metadata.generation, ctx,
                                                 first_failure(ready))
        return status

    async def _bind(self, snapshot: Snapshot, host: str | None) -> None:
        if host and snapshot.metadata.labels.get(HOST_LABEL) != host:
            await self.runtime.api.set_label(self.kind, snapshot.metadata.name, snapshot.metadata.namespace,
                                             HOST_LABEL, host)

    async def act(self, snapshot: Snapshot, status: SnapshotStatus) -> None:
        await self._bind(snapshot, status.host)

    async def finalize(self, snapshot: Snapshot) -> bool:
        """The agent removes both copies first; a snapshot never handed to an agent has none."""
        node = snapshot.status.node
        if snapshot.status.host is None or (node is not None and node.deleted):
            return True
        await self._bind(snapshot, snapshot.status.host)
        return False
