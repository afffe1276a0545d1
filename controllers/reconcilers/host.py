"""Host reconciler, with the host monitor: connection state from the agent's heartbeat Lease."""

from __future__ import annotations

import time

from controllers import inventory, kinds, metrics
from controllers.api.v1alpha1 import Host
from controllers.api.v1alpha1.host import HostState
from controllers.hostmonitor import HostMonitor, Lease, connection_state
from controllers.reconcilers.base import Dependents, InventoryReconciler
from controllers.runtime import Result


class HostReconciler(InventoryReconciler):
    kind = kinds.HOSTS
    dependents = (
        Dependents("storagepools", ".spec.host"),
        Dependents("virtualmachines", ".status.placement.host"),
    )
    agent_status_keys = ("node",)
    alert_after_seconds = 300.0

    def setup(self) -> None:
        super().setup()
        self.monitor = HostMonitor()
        self.index("hosts", ".spec.cluster", lambda host: [host.spec.cluster])
        self.index("leases", "host", lambda lease: [lease.host] if lease.host else [])
        self._next_check: dict[str, float | None] = {}

    def extra_watches(self):
        return {
            "clusters": lambda cluster: [self.key(h.metadata.name) for h in
                                         self.store.by("hosts", ".spec.cluster", cluster.metadata.name)],
            "leases": self._lease_changed,
        }

    def _lease_changed(self, lease: Lease):
        if lease.host is None:
            return []
        self.monitor.observe(lease.host, lease, time.monotonic())
        host = self.store.get("hosts", lease.host)
        # An Up host is re-checked by its own timer; a renewal only matters to a host that is not Up.
        if host is not None and host.status.state == HostState.UP:
            return []
        return [self.key(lease.host)]

    def _lease(self, name: str) -> Lease | None:
        leases = self.store.by("leases", "host", name)
        return leases[0] if leases else None

    def derive(self, host: Host, ctx: inventory.Context):
        name = host.metadata.name
        lease = self._lease(name)
        if lease is not None:
            self.monitor.observe(name, lease, time.monotonic())
        reported = host.status.node is not None and host.status.node.hypervisor_healthy is not None
        state, heartbeat, next_check = connection_state(
            self.monitor.last_seen(name), lease, reported, time.monotonic(), self.alert_after_seconds)
        self._next_check[name] = next_check
        return inventory.host_status(
            host, self.store.get("clusters", host.spec.cluster), (state, heartbeat),
            [inventory.guest_of(vm, self.store.get("serviceofferings", vm.spec.service_offering))
             for vm in self.store.by("virtualmachines", ".status.placement.host", name)],
            self.store.by("storagepools", ".spec.host", name), ctx)

    async def write_status(self, host: Host, status) -> None:
        await super().write_status(host, status)
        metrics.host_transition(host.status.state, status.state)

    def requeue(self, host: Host) -> Result:
        return Result(self._next_check.pop(host.metadata.name, None))
