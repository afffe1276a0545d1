"""StoragePool reconciler: scope checks, reachability from hosts, capacity and allocation."""

from __future__ import annotations

from controllers import inventory, kinds
from controllers.api.v1alpha1 import StoragePool
from controllers.api.v1alpha1.storagepool import PoolScope
from controllers.reconcilers.base import Dependents, InventoryReconciler


class StoragePoolReconciler(InventoryReconciler):
    coalesced = frozenset({"volumes", "hosts"})
    kind = kinds.STORAGEPOOLS
    dependents = (Dependents("volumes", ".status.storagePool"),)

    def setup(self) -> None:
        super().setup()
        self.index("storagepools", ".spec.zone", lambda pool: [pool.spec.zone])
        self.index("storagepools", ".spec.host", lambda pool: [pool.spec.host] if pool.spec.host else [])
        self.index("hosts", ".spec.cluster", lambda host: [host.spec.cluster])
        self.index("hosts", ".status.zone", lambda host: [host.status.zone] if host.status.zone else [])

    def extra_watches(self):
        return {
            "zones": lambda zone: [self.key(p.metadata.name) for p in
                                   self.store.by("storagepools", ".spec.zone", zone.metadata.name)],
            # The agent reports on pools by name; a host-scoped pool also follows its host's existence.
            "hosts": lambda host: [self.key(name) for name in (host.status.node.storage_pools if host.status.node
                                                               else {})]
            + [self.key(p.metadata.name) for p in self.store.by("storagepools", ".spec.host", host.metadata.name)],
            "clusters": lambda cluster: [self.key(p.metadata.name) for p in
                                         self.store.by("storagepools", ".spec.cluster", cluster.metadata.name)],
        }

    def _hosts(self, pool: StoragePool):
        if pool.spec.scope == PoolScope.HOST:
            host = self.store.get("hosts", pool.spec.host)
            return [host] if host else []
        if pool.spec.scope == PoolScope.CLUSTER:
            return self.store.by("hosts", ".spec.cluster", pool.spec.cluster)
        return self.store.by("hosts", ".status.zone", pool.spec.zone)

    def derive(self, pool: StoragePool, ctx: inventory.Context):
        scope_object = {PoolScope.HOST: lambda: self.store.get("hosts", pool.spec.host),
                        PoolScope.CLUSTER: lambda: self.store.get("clusters", pool.spec.cluster),
                        PoolScope.ZONE: lambda: None}[pool.spec.scope]()
        return inventory.pool_status(pool, self.store.get("zones", pool.spec.zone), scope_object, self._hosts(pool),
                                     self.store.by("volumes", ".status.storagePool", pool.metadata.name), ctx)
