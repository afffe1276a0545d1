"""Zone reconciler."""

from __future__ import annotations

from controllers import inventory, kinds
from controllers.api.v1alpha1 import Zone
from controllers.api.v1alpha1.storagepool import PoolScope
from controllers.reconcilers.base import Dependents, InventoryReconciler


class ZoneReconciler(InventoryReconciler):
    coalesced = frozenset({"virtualmachines", "volumes", "hosts", "storagepools", "hostpods", "networks", "templates"})
    kind = kinds.ZONES
    dependents = (
        Dependents("hostpods", ".spec.zone"),
        Dependents("storagepools", ".spec.zone"),
        Dependents("imagestores", ".spec.zone"),
        Dependents("physicalnetworks", ".spec.zone"),
        Dependents("networks", ".spec.zone"),
        Dependents("templates", ".spec.zone"),
        Dependents("virtualmachines", ".spec.zone"),
        Dependents("volumes", ".spec.zone"),
    )

    def setup(self) -> None:
        super().setup()
        self.index("hosts", ".status.zone", lambda host: [host.status.zone] if host.status.zone else [])

    def extra_watches(self):
        return {"hosts": lambda host: [self.key(host.status.zone)] if host.status.zone else []}

    def derive(self, zone: Zone, ctx: inventory.Context):
        name = zone.metadata.name
        pools = [p for p in self.store.by("storagepools", ".spec.zone", name) if p.spec.scope == PoolScope.ZONE]
        return inventory.zone_status(zone, self.store.by("hostpods", ".spec.zone", name),
                                     len(self.store.by("hosts", ".status.zone", name)), pools, ctx)
