"""Host reconciler, with the host monitor: connection state from the agent's heartbeat Lease, and HA
investigation (controllers.hainvestigation) once it expires: neighbours read the host's storage heartbeat, and
only a host silent on both is Down (fenced), which lets the VirtualMachine reconciler restart its HA guests."""

from __future__ import annotations

import json
import logging
import time

from controllers import hainvestigation, inventory, kinds, metrics, migration
from controllers.api.v1alpha1 import Host
from controllers.api.v1alpha1.common import API_VERSION
from controllers.api.v1alpha1.host import (INVESTIGATE_PREFIX, HostState, InvestigationRequest, ResourceState,
                                           investigate_annotation)
from controllers.api.v1alpha1.virtualmachinemigration import EVACUATION_LABEL
from controllers.conditions import Check
from controllers.hostmonitor import HostMonitor, Lease, connection_state

log = logging.getLogger(__name__)


def investigated(host: Host) -> list[str]:
    """The suspects this host is asked to investigate (from its annotations)."""
    found = []
    for key, value in (host.metadata.annotations or {}).items():
        if key.startswith(INVESTIGATE_PREFIX):
            try:
                found.append(str(json.loads(value)["host"]))
            except (ValueError, KeyError, TypeError):
                continue
    return found
from controllers.reconcilers.base import Dependents, InventoryReconciler
from controllers.runtime import Result


class HostReconciler(InventoryReconciler):
    coalesced = frozenset({"virtualmachines", "storagepools"})
    kind = kinds.HOSTS
    dependents = (
        Dependents("storagepools", ".spec.host"),
        Dependents("virtualmachines", ".status.placement.host"),
    )
    agent_status_keys = ("node",)
    alert_after_seconds = 300.0
    down_after_seconds = 90.0
    """Lease and storage heartbeat both silent this long → Down. Must exceed the agents' --fence-after plus one
    storage-heartbeat and one check interval (see controllers.hainvestigation)."""

    def setup(self) -> None:
        super().setup()
        self.monitor = HostMonitor()
        self.index("hosts", ".spec.cluster", lambda host: [host.spec.cluster])
        self.index("hosts", "ha-zone", lambda host: [host.status.zone] if host.status.zone else [])
        self.index("hosts", "investigating", investigated)
        self.index("leases", "host", lambda lease: [lease.host] if lease.host else [])
        self._next_check: dict[str, float | None] = {}
        self._requests: dict[str, dict[str, str]] = {}  # suspect -> neighbour -> annotation value
        self._down_renew: dict[str, str | None] = {}  # suspect -> the Lease's renewTime when it was found Down
        self.index("virtualmachinemigrations", "evacuating",
                   lambda m: [v] if (v := m.metadata.labels.get(EVACUATION_LABEL)) else [])

    def extra_watches(self):
        return {
            "clusters": lambda cluster: [self.key(h.metadata.name) for h in
                                         self.store.by("hosts", ".spec.cluster", cluster.metadata.name)],
            "leases": self._lease_changed,
            # A neighbour's answer (its status.node.investigations) re-judges the hosts it investigates.
            "hosts": lambda host: [self.key(name) for name in investigated(host)],
            "virtualmachinemigrations": lambda m: [self.key(host) for host in
                                                   {m.metadata.labels.get(EVACUATION_LABEL), m.status.source_host}
                                                   if host and (h := self.store.get("hosts", host)) is not None
                                                   and (h.spec.maintenance or host == m.metadata.labels.get(
                                                       EVACUATION_LABEL))],
        }

    def forget(self, key) -> None:
        self.monitor.forget(key[2])
        self._requests.pop(key[2], None)
        self._down_renew.pop(key[2], None)

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
        now = time.monotonic()
        seen = self.monitor.last_seen(name)
        state, heartbeat, next_check = connection_state(seen, lease, reported, now, self.alert_after_seconds)
        requests: dict[str, str] = {}
        down_renew = self._down_renew.get(name, self.monitor.first_renew_time(name))
        if host.status.state == HostState.DOWN and lease is not None and lease.renew_time == down_renew and \
                not ctx.deleting:
            # Fenced, and not one renewal since (across controller restarts too): it stays Down.
            previous = next((c for c in host.status.conditions if c.type == "Heartbeat"), None)
            state, heartbeat, next_check = HostState.DOWN, Check.failed(
                "Fenced", previous.message if previous and previous.reason == "Fenced" else
                f"host {name} was found Down (fenced)"), None
        elif state in (HostState.DISCONNECTED, HostState.ALERT) and host.spec.ha_enabled and seen is not None \
                and not ctx.deleting:
            lease_age = now - seen.seen_at
            outcome, requests = self._investigate(host, lease_age)
            if outcome.outcome == hainvestigation.Outcome.ALIVE:
                state = HostState.ALERT
            elif outcome.outcome == hainvestigation.Outcome.DEAD:
                state = HostState.DOWN
                self._down_renew[name] = lease.renew_time if lease else None
                requests = {}
                log.warning("host is Down: fenced", extra={"host": name, "reason": outcome.check.message})
            if outcome.outcome in (hainvestigation.Outcome.ALIVE, hainvestigation.Outcome.DEAD):
                heartbeat = outcome.check
            else:  # the monitor's reason stays (HeartbeatLost…); the investigation says where it stands
                heartbeat = Check.failed(heartbeat.reason, f"{heartbeat.message}; {outcome.check.message}")
            if outcome.outcome == hainvestigation.Outcome.PENDING and lease_age < self.down_after_seconds:
                wait = self.down_after_seconds - lease_age + 0.1
                next_check = wait if next_check is None else min(next_check, wait)
        self._requests[name] = requests
        self._next_check[name] = next_check
        placed = self.store.by("virtualmachines", ".status.placement.host", name)
        return inventory.host_status(
            host, self.store.get("clusters", host.spec.cluster), (state, heartbeat),
            [inventory.guest_of(vm, self.store.get("serviceofferings", vm.spec.service_offering)) for vm in placed],
            self.store.by("storagepools", ".spec.host", name), ctx, self._evacuation(host, placed))

    # -- maintenance ---------------------------------------------------------------------------

    def _evacuation(self, host: Host, placed: list) -> migration.Evacuation | None:
        if not host.spec.maintenance:
            return None
        name = host.metadata.name
        migrations = [m for m in self.store.list("virtualmachinemigrations") if m.status.source_host == name
                      or m.metadata.labels.get(EVACUATION_LABEL) == name]
        return migration.evacuation(name, placed, migrations)

    async def _maintain(self, host: Host, status) -> None:
        """Maintenance: one live migration per guest still placed here (the planner picks each target); a cancel
        removes this host's finished evacuation records, so the next maintenance tries every guest afresh."""
        name = host.metadata.name
        api = self.runtime.api
        if host.spec.maintenance:
            if status.resource_state != ResourceState.PREPARE_FOR_MAINTENANCE:
                return
            evacuating = self._evacuation(host, self.store.by("virtualmachines", ".status.placement.host", name))
            for namespace, vm_name in evacuating.to_migrate if evacuating else ():
                vm = self.store.get("virtualmachines", vm_name, namespace)
                if vm is None:
                    continue
                await api.create(kinds.VIRTUALMACHINEMIGRATIONS, {
                    "apiVersion": API_VERSION, "kind": "VirtualMachineMigration",
                    "metadata": {"name": migration.evacuation_name(name, vm_name, vm.metadata.uid),
                                 "namespace": namespace, "labels": {EVACUATION_LABEL: name}},
                    "spec": {"virtualMachine": {"name": vm_name}}})
            return
        for record in self.store.by("virtualmachinemigrations", "evacuating", name):
            if not migration.active(record) and record.metadata.deletion_timestamp is None:
                await api.delete(kinds.VIRTUALMACHINEMIGRATIONS, record.metadata.name, record.metadata.namespace)

    def _investigate(self, host: Host, lease_age: float) -> tuple[hainvestigation.Verdict, dict[str, str]]:
        """Ask neighbours to read the host's storage heartbeat; judge their answers."""
        name = host.metadata.name
        node = host.status.node
        reachable = [pool for pool, report in node.storage_pools.items() if report.reachable] if node else []
        pools = hainvestigation.heartbeat_pools(
            reachable, {pool: self.store.get("storagepools", pool) for pool in reachable})
        pools = hainvestigation.with_activity_disks(pools, [
            (disk.pool, disk.pool_type, disk.path)
            for vm in self.store.by("virtualmachines", ".status.placement.host", name)
            if vm.status.launch is not None and vm.status.launch.ha_enabled for disk in vm.status.launch.disks])
        others = self.store.by("hosts", "ha-zone", host.status.zone) if host.status.zone else []
        candidates = [hainvestigation.Neighbour(
            other.metadata.name, other.status.state == HostState.UP,
            frozenset(p for p, r in (other.status.node.storage_pools.items() if other.status.node else []) if r.reachable))
            for other in others]
        asked = hainvestigation.choose_neighbours(name, pools, candidates)
        answers = {}
        for neighbour in asked:
            other = self.store.get("hosts", neighbour)
            answers[neighbour] = other.status.node.investigations.get(name) if other and other.status.node else None
        verdict = hainvestigation.verdict(name, pools, asked, answers, lease_age, self.down_after_seconds)
        requests = {neighbour: json.dumps(InvestigationRequest(
            host=name, stale_after_seconds=self.down_after_seconds, pools=mine).model_dump(by_alias=True, mode="json"),
            sort_keys=True) for neighbour, mine in asked.items()}
        return verdict, requests

    async def _sync_requests(self, name: str, wanted: dict[str, str]) -> None:
        """Put the investigation annotation on the chosen neighbours and take it off the others."""
        key = investigate_annotation(name)
        current = {other.metadata.name: (other.metadata.annotations or {}).get(key)
                   for other in self.store.by("hosts", "investigating", name)}
        for neighbour, value in wanted.items():
            if current.get(neighbour) != value:
                await self.runtime.api.patch(self.kind, neighbour, None, {"metadata": {"annotations": {key: value}}})
        for neighbour in current:
            if neighbour not in wanted:
                await self.runtime.api.patch(self.kind, neighbour, None, {"metadata": {"annotations": {key: None}}})

    async def act(self, host: Host, status) -> None:
        await self._sync_requests(host.metadata.name, self._requests.get(host.metadata.name, {}))
        await self._maintain(host, status)

    async def finalize(self, host: Host) -> bool:
        await self._sync_requests(host.metadata.name, {})
        return True

    async def write_status(self, host: Host, status) -> None:
        await super().write_status(host, status)
        metrics.host_transition(host.status.state, status.state)

    def requeue(self, host: Host) -> Result:
        return Result(self._next_check.pop(host.metadata.name, None))
