"""PhysicalNetwork reconciler: zone, bridges present on the zone's hosts, VNI/VLAN and public IP use."""

from __future__ import annotations

from controllers import inventory, kinds
from controllers.api.v1alpha1 import PhysicalNetwork
from controllers.reconcilers.base import Dependents, InventoryReconciler


class PhysicalNetworkReconciler(InventoryReconciler):
    kind = kinds.PHYSICALNETWORKS
    dependents = (Dependents("networks", ".status.physicalNetwork"),)

    def setup(self) -> None:
        super().setup()
        self.index("physicalnetworks", ".spec.zone", lambda network: [network.spec.zone])
        self.index("hosts", ".status.zone", lambda host: [host.status.zone] if host.status.zone else [])
        self.index("publicipaddresses", ".status.physicalNetwork",
                   lambda ip: [ip.status.physical_network] if ip.status.physical_network and ip.status.ip_address
                   else [])

    def _in_zone(self, zone: str | None):
        return [self.key(n.metadata.name) for n in self.store.by("physicalnetworks", ".spec.zone", zone)]

    def extra_watches(self):
        return {
            "zones": lambda zone: self._in_zone(zone.metadata.name),
            "hosts": lambda host: self._in_zone(host.status.zone),
            "publicipaddresses": lambda ip: [self.key(ip.status.physical_network)] if ip.status.physical_network
            else [],
        }

    def derive(self, network: PhysicalNetwork, ctx: inventory.Context):
        name = network.metadata.name
        implemented = [n for n in self.store.by("networks", ".status.physicalNetwork", name) if n.status.broadcast_uri]
        return inventory.physical_network_status(
            network, self.store.get("zones", network.spec.zone), self.store.by("hosts", ".status.zone",
                                                                                network.spec.zone),
            len(implemented), len(self.store.by("publicipaddresses", ".status.physicalNetwork", name)), ctx)
