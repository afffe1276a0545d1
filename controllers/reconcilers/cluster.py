"""Cluster reconciler."""

from __future__ import annotations

from controllers import inventory, kinds
from controllers.api.v1alpha1 import Cluster
from controllers.api.v1alpha1.storagepool import PoolScope
from controllers.reconcilers.base import Dependents, InventoryReconciler


class ClusterReconciler(InventoryReconciler):
    coalesced = frozenset({"hosts", "storagepools"})
    kind = kinds.CLUSTERS
    dependents = (Dependents("hosts", ".spec.cluster"), Dependents("storagepools", ".spec.cluster"))

    def setup(self) -> None:
        super().setup()
        self.index("clusters", ".spec.pod", lambda cluster: [cluster.spec.pod])

    def extra_watches(self):
        return {"hostpods": lambda pod: [self.key(c.metadata.name) for c in
                                         self.store.by("clusters", ".spec.pod", pod.metadata.name)]}

    def derive(self, cluster: Cluster, ctx: inventory.Context):
        name = cluster.metadata.name
        pools = [p for p in self.store.by("storagepools", ".spec.cluster", name) if p.spec.scope == PoolScope.CLUSTER]
        return inventory.cluster_status(cluster, self.store.get("hostpods", cluster.spec.pod),
                                        self.store.by("hosts", ".spec.cluster", name), pools, ctx)
