"""HostPod reconciler."""

from __future__ import annotations

from controllers import inventory, kinds
from controllers.api.v1alpha1 import HostPod
from controllers.reconcilers.base import Dependents, InventoryReconciler


class HostPodReconciler(InventoryReconciler):
    coalesced = frozenset({"clusters"})
    kind = kinds.HOSTPODS
    dependents = (Dependents("clusters", ".spec.pod"),)

    def setup(self) -> None:
        super().setup()
        self.index("hostpods", ".spec.zone", lambda pod: [pod.spec.zone])

    def extra_watches(self):
        # A zone appearing, disappearing or being disabled changes its pods' readiness.
        return {"zones": lambda zone: [self.key(p.metadata.name) for p in
                                       self.store.by("hostpods", ".spec.zone", zone.metadata.name)]}

    def derive(self, pod: HostPod, ctx: inventory.Context):
        return inventory.hostpod_status(pod, self.store.get("zones", pod.spec.zone),
                                        self.store.by("clusters", ".spec.pod", pod.metadata.name), ctx)
