"""ImageStore reconciler: reachability from the zone's hosts, capacity, what it holds."""

from __future__ import annotations

from controllers import inventory, kinds
from controllers.api.v1alpha1 import ImageStore
from controllers.reconcilers.base import Dependents, InventoryReconciler


class ImageStoreReconciler(InventoryReconciler):
    kind = kinds.IMAGESTORES
    # Neither reference is a selectable scalar field, so the primed store alone decides these.
    dependents = (
        Dependents("templates", "imageStore", lambda template: [copy.image_store for copy in template.status.zones]),
        Dependents("snapshots", "secondaryStore",
                   lambda snapshot: [snapshot.status.secondary.store] if snapshot.status.secondary else []),
    )

    def setup(self) -> None:
        super().setup()
        self.index("imagestores", ".spec.zone", lambda store: [store.spec.zone])
        self.index("hosts", ".status.zone", lambda host: [host.status.zone] if host.status.zone else [])

    def extra_watches(self):
        return {
            "zones": lambda zone: [self.key(s.metadata.name) for s in
                                   self.store.by("imagestores", ".spec.zone", zone.metadata.name)],
            "hosts": lambda host: [self.key(name) for name in (host.status.node.image_stores if host.status.node
                                                               else {})],
        }

    def derive(self, store: ImageStore, ctx: inventory.Context):
        name = store.metadata.name
        return inventory.image_store_status(
            store, self.store.get("zones", store.spec.zone), self.store.by("hosts", ".status.zone", store.spec.zone),
            len(self.store.by("templates", "imageStore", name)), len(self.store.by("snapshots", "secondaryStore", name)),
            ctx)
