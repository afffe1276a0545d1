"""Service, disk and network offering reconcilers: enabled state, users, deletion while in use."""

from __future__ import annotations

import typing as t

from controllers import inventory, kinds
from controllers.api.v1alpha1.diskoffering import DiskOfferingStatus
from controllers.api.v1alpha1.networkoffering import NetworkOfferingStatus
from controllers.api.v1alpha1.serviceoffering import ServiceOfferingStatus
from controllers.reconcilers.base import Dependents, InventoryReconciler


class OfferingReconciler(InventoryReconciler):
    """An offering is Ready while enabled; its users (its only dependents) are counted in ``users_field``."""
    coalesced = frozenset({"virtualmachines", "volumes", "networks"})

    status_class: t.ClassVar[type]
    users_field: t.ClassVar[str]

    def derive(self, offering: t.Any, ctx: inventory.Context) -> t.Any:
        ready = inventory.offering_ready(offering.spec.enabled)
        generation = offering.metadata.generation
        (users,) = self.dependents
        return self.status_class(**{
            "observed_generation": generation, "phase": inventory.phase(ctx, ready),
            "conditions": inventory.conditions(offering.status.conditions, generation, ctx, ready),
            self.users_field: self.store.count(users.plural, users.index, offering.metadata.name),
        })


class ServiceOfferingReconciler(OfferingReconciler):
    kind = kinds.SERVICEOFFERINGS
    dependents = (Dependents("virtualmachines", ".spec.serviceOffering"),)
    status_class, users_field = ServiceOfferingStatus, "virtual_machines"


class DiskOfferingReconciler(OfferingReconciler):
    kind = kinds.DISKOFFERINGS
    dependents = (Dependents("volumes", ".spec.diskOffering"),)
    status_class, users_field = DiskOfferingStatus, "volumes"


class NetworkOfferingReconciler(OfferingReconciler):
    kind = kinds.NETWORKOFFERINGS
    dependents = (Dependents("networks", ".spec.networkOffering"),)
    status_class, users_field = NetworkOfferingStatus, "networks"
