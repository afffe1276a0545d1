"""Service, disk and network offering reconcilers: enabled state, users, deletion while in use."""

from __future__ import annotations

from controllers import inventory, kinds
from controllers.api.v1alpha1.diskoffering import DiskOffering, DiskOfferingStatus
from controllers.api.v1alpha1.networkoffering import NetworkOffering, NetworkOfferingStatus
from controllers.api.v1alpha1.serviceoffering import ServiceOffering, ServiceOfferingStatus
from controllers.reconcilers.base import Dependents, InventoryReconciler


class ServiceOfferingReconciler(InventoryReconciler):
    kind = kinds.SERVICEOFFERINGS
    dependents = (Dependents("virtualmachines", ".spec.serviceOffering"),)

    def derive(self, offering: ServiceOffering, ctx: inventory.Context):
        ready = inventory.offering_ready(offering.spec.enabled)
        generation = offering.metadata.generation
        return ServiceOfferingStatus(
            observed_generation=generation, phase=inventory.phase(ctx, ready),
            conditions=inventory.conditions(offering.status.conditions, generation, ctx, ready),
            virtual_machines=len(self.store.by("virtualmachines", ".spec.serviceOffering", offering.metadata.name)),
        )


class DiskOfferingReconciler(InventoryReconciler):
    kind = kinds.DISKOFFERINGS
    dependents = (Dependents("volumes", ".spec.diskOffering"),)

    def derive(self, offering: DiskOffering, ctx: inventory.Context):
        ready = inventory.offering_ready(offering.spec.enabled)
        generation = offering.metadata.generation
        return DiskOfferingStatus(
            observed_generation=generation, phase=inventory.phase(ctx, ready),
            conditions=inventory.conditions(offering.status.conditions, generation, ctx, ready),
            volumes=len(self.store.by("volumes", ".spec.diskOffering", offering.metadata.name)),
        )


class NetworkOfferingReconciler(InventoryReconciler):
    kind = kinds.NETWORKOFFERINGS
    dependents = (Dependents("networks", ".spec.networkOffering"),)

    def derive(self, offering: NetworkOffering, ctx: inventory.Context):
        ready = inventory.offering_ready(offering.spec.enabled)
        generation = offering.metadata.generation
        return NetworkOfferingStatus(
            observed_generation=generation, phase=inventory.phase(ctx, ready),
            conditions=inventory.conditions(offering.status.conditions, generation, ctx, ready),
            networks=len(self.store.by("networks", ".spec.networkOffering", offering.metadata.name)),
        )
