"""VirtualMachine reconciler: CloudStack's deploy workflow as a level-based reconcile.

Running: check references → placement (planner + ledger) → root volume created on the planner's pool →
placement and launch description (the root disk's target included) recorded in one status write before
any agent acts → the host's agent creates the root disk, starts the domain and reports it. Stopped: the
launch says Stopped, the agent shuts the domain down, then the placement and its reserved capacity are
released (a local root disk keeps the guest's next start on the same host). Destroyed: stopped and kept,
recoverable, until the expunge delay passes; then, as when the object is deleted, its root disk is deleted
and the object goes.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import operator
import typing as t

from controllers import hainvestigation, inventory, ipam, kinds, metrics, migration, planner
from controllers.api.v1alpha1 import VirtualMachine
from controllers.api.v1alpha1.common import API_VERSION, FINALIZER, AllocationState
from controllers.api.v1alpha1.host import HOST_LABEL, HostState
from controllers.api.v1alpha1.storagepool import PoolScope, PoolState
from controllers.api.v1alpha1.template import ImageFormat, TemplateState
from controllers.api.v1alpha1.network import NetworkPhase, TrafficRule
from controllers.api.v1alpha1.networkoffering import GuestIpType, NetworkService
from controllers.api.v1alpha1.virtualmachine import (
    USER_DATA_KEY,
    DesiredState,
    LaunchDisk,
    LaunchNic,
    LaunchSpec,
    NicStatus,
    Placement,
    SecretKeyReference,
    SecurityGroupPolicy,
    VirtualMachineStatus,
    VmPhase,
)
from controllers.api.v1alpha1.volume import VolumeType
from controllers.api.v1alpha1.zone import AllocationAlgorithm
from controllers.conditions import Check, find, first_failure, is_true
from controllers.reconcilers.base import InventoryReconciler
from controllers.reconcilers.network import guest_segment, network_key, nic_networks, nic_owner, offers, traffic_rule
from controllers.runtime import Result, deleting, utcnow

GIB = 1024**3
SCHEDULED, STORAGE_READY, NETWORK_READY = "Scheduled", "StorageReady", "NetworkReady"
VOLUME_PROGRESS = frozenset({"Creating", "Resizing"})
"""Ready reasons of a volume on its normal way to Ready: the guest says only that its root disk is being created,
so each step of the volume does not rewrite the guest's status."""
NIC_REASONS = frozenset({"NetworkNotFound", "NetworkNotReady", "NetworkNotVisible", "NetworkInOtherZone",
                         "InsufficientAddressCapacity", "IpAddressInUse", "IpAddressOutOfRange", "IpAddressReserved"})


def vm_key(vm: VirtualMachine) -> str:
    return f"{vm.metadata.namespace}/{vm.metadata.name}"


def root_volume_name(vm: VirtualMachine) -> str:
    return f"{vm.metadata.name}-root"


def domain_stopped(vm: VirtualMachine) -> bool:
    node = vm.status.node
    return node is None or node.domain_state in (None, "", "shutoff", "gone")


class VirtualMachineReconciler(InventoryReconciler):
    kind = kinds.VIRTUALMACHINES
    agent_status_keys = ("node",)
    progress_reasons = frozenset({"Starting", "CreatingRootVolume", "NetworkImplementing"})

    def setup(self) -> None:
        super().setup()
        self.ledger = planner.Ledger()
        self.index("virtualmachines", ".spec.serviceOffering", lambda vm: [vm.spec.service_offering])
        self.index("virtualmachines", "template", lambda vm: [
            f"{vm.spec.template.namespace or vm.metadata.namespace}/{vm.spec.template.name}"])
        self.index("virtualmachines", "affinity", lambda vm: [f"{vm.metadata.namespace}/{g}"
                                                             for g in vm.spec.affinity_groups])
        self.index("volumes", "vm", lambda v: [f"{v.metadata.namespace}/{v.spec.virtual_machine.name}"]
                   if v.spec.virtual_machine else [])
        self.index("hosts", ".status.zone", lambda host: [host.status.zone] if host.status.zone else [])
        self.index("virtualmachines", "ha-host", lambda vm: [vm.status.placement.host]
                   if vm.status.placement and vm.status.placement.host else [])
        self.index("virtualmachines", "nic-network", nic_networks)
        self.index("virtualmachines", "security-group", lambda vm: [network_key(vm.metadata.namespace, g)
                                                                     for g in vm.spec.security_groups])
        self._waiting_for_capacity: set[tuple[str, str]] = set()
        self.placements = metrics.PlacementClock()
        self._inventory_cache: tuple[tuple, tuple, planner.Inventory] | None = None
        # (plural, name) -> (the stored object, its planner candidate); see _candidates.
        self._candidate_cache: dict[tuple[str, str], tuple[t.Any, t.Any]] = {}
        # Placements decided but maybe not back from the watch yet: key -> (uid, placement, message).
        self._decided: dict[str, tuple[str, Placement, str]] = {}

    def primed(self) -> None:
        """Rebuild the ledger from the placements recorded in the objects."""
        for vm in self.store.list("virtualmachines"):
            if vm.status.placement and vm.status.placement.host:
                self._reserve(vm, vm.status.placement.host)
            elif (host := self._unrecorded_host(vm)) is not None:
                self._reserve(vm, host)
            if vm.status.migration is not None and vm.status.launch is not None:
                # A live migration's target holds the guest's size too until the move ends (see migration).
                self.ledger.reserve(migration.reservation_key(vm_key(vm)), vm.status.migration.target_host,
                                    vm.status.launch.cpu_number, vm.status.launch.memory_mib, vm.metadata.namespace)

    def _unrecorded_host(self, vm: VirtualMachine) -> str | None:
        """The only host a guest that should run but has no recorded placement can go to: the one of the local
        pool its root disk is on (``_place`` keeps to that pool). A controller stopped between ``prepare``, which
        created the root Volume on the planner's pool, and the status write leaves such a guest; its host's
        capacity is held for it from the start, lest guests reconciled before it take the place."""
        if vm.spec.state != DesiredState.RUNNING:
            return None
        root = self.store.get("volumes", root_volume_name(vm), vm.metadata.namespace)
        name = (root.status.storage_pool or root.spec.storage_pool) if root is not None else None
        pool = self.store.get("storagepools", name) if name else None
        return pool.spec.host if pool is not None and pool.spec.scope == PoolScope.HOST else None

    def watch_map(self):
        def vms(index: str, value: str):
            return [self.key(v.metadata.name, v.metadata.namespace) for v in self.store.by("virtualmachines", index,
                                                                                           value)]

        def unscheduled(_obj):
            # Capacity appeared or changed somewhere: retry the guests that found no host.
            return [self.key(name, namespace) for namespace, name in self._waiting_for_capacity]

        return {
            "volumes": lambda v: [self.key(v.spec.virtual_machine.name, v.metadata.namespace)]
            if v.spec.virtual_machine else [],
            "serviceofferings": lambda o: vms(".spec.serviceOffering", o.metadata.name),
            "templates": lambda tmpl: vms("template", f"{tmpl.metadata.namespace}/{tmpl.metadata.name}"),
            "hosts": lambda host: [*unscheduled(host), *(
                vms("ha-host", host.metadata.name) if host.status.state == HostState.DOWN else [])],
            "storagepools": unscheduled,
            # Only guests still waiting for the network: a running guest's NICs do not follow the network's
            # counters, and a burst of allocations would otherwise requeue every guest on it each time.
            "networks": lambda n: [self.key(vm.metadata.name, vm.metadata.namespace) for vm in self.store.by(
                "virtualmachines", "nic-network", network_key(n.metadata.namespace, n.metadata.name))
                if not is_true(vm.status.conditions, NETWORK_READY)],
            "securitygroups": lambda g: self._security_group_users(g),
            "virtualmachines": lambda vm: [k for g in vm.spec.affinity_groups
                                           for k in vms("affinity", f"{vm.metadata.namespace}/{g}")
                                           if k[2] != vm.metadata.name and (vm.metadata.namespace, k[2])
                                           in self._waiting_for_capacity] + self._peers(vm),
        }

    def forget(self, key) -> None:
        self.ledger.release(f"{key[1]}/{key[2]}")
        self.ledger.release(migration.reservation_key(f"{key[1]}/{key[2]}"))
        self._decided.pop(f"{key[1]}/{key[2]}", None)
        self._waiting_for_capacity.discard((key[1], key[2]))
        self.placements.forget(f"{key[1]}/{key[2]}")

    # -- references -----------------------------------------------------------------------------

    def _offering(self, vm: VirtualMachine) -> tuple[t.Any, Check]:
        offering = self.store.get("serviceofferings", vm.spec.service_offering)
        if offering is None:
            return None, Check.failed("ServiceOfferingNotFound",
                                      f"ServiceOffering {vm.spec.service_offering} does not exist")
        if not offering.spec.enabled:
            return None, Check.failed("ServiceOfferingDisabled", f"ServiceOffering {vm.spec.service_offering} is "
                                                                 "disabled")
        return offering, Check.passed()

    def _template(self, vm: VirtualMachine) -> tuple[t.Any, Check]:
        ref = vm.spec.template
        namespace = ref.namespace or vm.metadata.namespace
        template = self.store.get("templates", ref.name, namespace)
        if template is None:
            return None, Check.failed("TemplateNotFound", f"Template {namespace}/{ref.name} does not exist")
        if namespace != vm.metadata.namespace and not template.spec.public:
            return None, Check.failed("TemplateNotVisible", f"Template {namespace}/{ref.name} is private to "
                                                            f"namespace {namespace}; only public templates can be used "
                                                            "from other namespaces")
        copy = next((c for c in template.status.zones if c.zone == vm.spec.zone), None)
        if copy is None or copy.state != TemplateState.READY:
            state = copy.state.value if copy else "not registered"
            return None, Check.failed("TemplateNotReady",
                                      f"Template {namespace}/{ref.name} is {state} in zone {vm.spec.zone}")
        if template.spec.format == ImageFormat.ISO:
            return None, Check.failed("TemplateIsISO", "booting from an ISO is not supported yet; use a disk template")
        return template, Check.passed()

    def _zone(self, vm: VirtualMachine) -> tuple[t.Any, Check]:
        zone = self.store.get("zones", vm.spec.zone)
        if zone is None:
            return None, Check.failed("ZoneNotFound", f"Zone {vm.spec.zone} does not exist")
        return zone, Check.passed()

    # -- placement ------------------------------------------------------------------------------

    def _reserve(self, vm: VirtualMachine, host: str) -> None:
        launch = vm.status.launch
        offering = self.store.get("serviceofferings", vm.spec.service_offering)
        cpu = launch.cpu_number if launch else (offering.spec.cpu_number if offering else 0)
        memory = launch.memory_mib if launch else (offering.spec.memory_mib if offering else 0)
        self.ledger.reserve(vm_key(vm), host, cpu, memory, vm.metadata.namespace)

    def _inventory(self, zone: str) -> planner.Inventory:
        """The planner's view of the zone, rebuilt only when a host's or pool's candidate changed (a placement
        changes its host's allocation, which no candidate holds, and its pool's, which one does)."""
        version = (zone, self.store.changes("hosts"), self.store.changes("storagepools"))
        if self._inventory_cache is not None and self._inventory_cache[0] == version:
            return self._inventory_cache[2]
        candidates = self._candidates(zone)
        if self._inventory_cache is not None and self._inventory_cache[0][0] == zone and \
                all(len(new) == len(old) and all(map(operator.is_, new, old))
                    for new, old in zip(candidates, self._inventory_cache[1])):
            self._inventory_cache = (version, candidates, self._inventory_cache[2])
        else:
            self._inventory_cache = (version, candidates, planner.Inventory(*candidates))
        return self._inventory_cache[2]

    def _candidates(self, zone: str) -> tuple[list[planner.HostCandidate], list[planner.PoolCandidate]]:
        """Each host's and pool's candidate, recomputed only for objects stored since it was computed (the store
        replaces an object on every change): at 1,000 hosts and pools a placement recomputes two, not 2,000."""
        hosts = [self._host_candidate(host, zone) for host in self.store.by("hosts", ".status.zone", zone)]
        all_pools = self.store.list("storagepools")
        pools = [self._pool_candidate(pool) for pool in all_pools if pool.spec.zone == zone]
        if len(self._candidate_cache) > 2 * (self.store.size("hosts") + len(all_pools)) + 64:
            # Deleted hosts and pools: drop their entries now and then.
            self._candidate_cache = {key: value for key, value in self._candidate_cache.items()
                                     if self.store.get(*key) is value[0]}
        return hosts, pools

    def _host_candidate(self, host: t.Any, zone: str) -> planner.HostCandidate:
        cached = self._candidate_cache.get(("hosts", host.metadata.name))
        if cached is not None and cached[0] is host:
            return cached[1]
        status = host.status
        capacity = status.capacity
        unusable = ""
        if status.state != HostState.UP:
            unusable = (status.state or HostState.CONNECTING).value
        elif status.effective_allocation_state != AllocationState.ENABLED:
            unusable = status.resource_state.value if status.resource_state else "Disabled"
        elif not find(status.conditions, "HypervisorHealthy") or \
                find(status.conditions, "HypervisorHealthy").status.value != "True":
            unusable = "reporting a hypervisor error"
        candidate = planner.HostCandidate(
            name=host.metadata.name, zone=zone, pod=status.pod or "", cluster=host.spec.cluster,
            hypervisor=(status.node.hypervisor_type.value if status.node and status.node.hypervisor_type else ""),
            tags=frozenset(host.spec.host_tags), cpu_total=capacity.cpu_cores.total if capacity else 0,
            memory_total_mib=capacity.memory_mib.total if capacity else 0, unusable=unusable)
        return self._cache_candidate("hosts", host, candidate, cached)

    def _cache_candidate(self, plural: str, obj: t.Any, candidate: t.Any, cached: tuple | None) -> t.Any:
        """Keep the cached candidate when it did not change, so the inventory can compare by identity."""
        if cached is not None and cached[1] == candidate:
            candidate = cached[1]
        self._candidate_cache[(plural, obj.metadata.name)] = (obj, candidate)
        return candidate

    def _pool_candidate(self, pool: t.Any) -> planner.PoolCandidate:
        cached = self._candidate_cache.get(("storagepools", pool.metadata.name))
        if cached is not None and cached[0] is pool:
            return cached[1]
        scope_name = {PoolScope.HOST: pool.spec.host, PoolScope.CLUSTER: pool.spec.cluster}.get(pool.spec.scope,
                                                                                               pool.spec.zone)
        candidate = planner.PoolCandidate(
            name=pool.metadata.name, scope=pool.spec.scope.value, scope_name=scope_name or "",
            tags=frozenset(pool.spec.tags), usable=pool.spec.enabled and pool.status.state == PoolState.UP,
            hosts=frozenset(h for h, a in pool.status.host_access.items() if a.reachable),
            capacity_bytes=int((pool.status.capacity_bytes or 0) * pool.spec.overprovisioning_factor),
            allocated_bytes=pool.status.allocated_bytes or 0, local=pool.spec.scope == PoolScope.HOST)
        return self._cache_candidate("storagepools", pool, candidate, cached)

    def _affinity(self, vm: VirtualMachine) -> tuple[planner.AffinityRule, ...]:
        rules = []
        for group_name in vm.spec.affinity_groups:
            group = self.store.get("affinitygroups", group_name, vm.metadata.namespace)
            if group is None:
                continue  # reported by _affinity_check
            members = {other.status.placement.host for other in
                       self.store.by("virtualmachines", "affinity", f"{vm.metadata.namespace}/{group_name}")
                       if other.metadata.name != vm.metadata.name and other.status.placement
                       and other.status.placement.host}
            rules.append(planner.AffinityRule(group_name, group.spec.type.value, frozenset(members)))
        return tuple(rules)

    def _place(self, vm: VirtualMachine, offering: t.Any, template: t.Any, zone: t.Any, root: t.Any) -> \
            planner.Decision:
        # Not counted against itself: a guest being placed again holds no capacity yet (a reservation held for it
        # since a restart, see _unrecorded_host, or one of a placement now lost, goes; the decision reserves anew).
        self.ledger.release(vm_key(vm))
        hypervisor = template.spec.hypervisor.value
        disk_bytes = (vm.spec.root_disk_size_gib or offering.spec.root_disk_size_gib or 0) * GIB or \
            (template.status.virtual_size_bytes or 0)
        pin = vm.spec.placement or Placement()
        request = planner.Request(
            key=vm_key(vm), owner=vm.metadata.namespace, zone=vm.spec.zone, cpu=offering.spec.cpu_number,
            memory_mib=offering.spec.memory_mib, hypervisor=hypervisor, host_tags=frozenset(offering.spec.host_tags),
            storage_type=offering.spec.storage_type.value, storage_tags=frozenset(offering.spec.storage_tags),
            disk_bytes=disk_bytes, affinity=self._affinity(vm), pod=pin.pod, cluster=pin.cluster, host=pin.host)
        # A root volume created just before its guest's placement was recorded names the planner's pool in its
        # spec only (see prepare).
        existing_pool = (root.status.storage_pool or root.spec.storage_pool) if root is not None else None
        if existing_pool:
            # The root disk already exists: only hosts that reach its pool will do. A pool the volume was
            # explicitly moved to (spec.storagePool: a storage migration), not the offering, says whether that is
            # local or shared storage.
            hosts, pools = self._candidates(vm.spec.zone)
            own = [p for p in pools if p.name == existing_pool and root.spec.storage_pool == existing_pool]
            inventory = planner.Inventory(hosts, [p for p in pools if p.name == existing_pool])
            request = dataclasses.replace(request, disk_bytes=0, storage_type="local" if own and own[0].local
                                          else "shared" if own else request.storage_type,
                                          storage_tags=frozenset() if own else request.storage_tags)
        else:
            inventory = self._inventory(vm.spec.zone)
        return planner.plan(request, inventory, self.ledger, zone.spec.allocation_algorithm
                            if zone else AllocationAlgorithm.FIRST_FIT)

    # -- derive ---------------------------------------------------------------------------------

    def _volumes(self, vm: VirtualMachine) -> tuple[t.Any, list[t.Any]]:
        volumes = self.store.by("volumes", "vm", vm_key(vm))
        root = next((v for v in volumes if v.spec.type == VolumeType.ROOT), None)
        data = sorted((v for v in volumes if v.spec.type != VolumeType.ROOT), key=lambda v: v.metadata.name)
        return root, data

    def derive(self, vm: VirtualMachine, ctx: inventory.Context) -> VirtualMachineStatus:
        previous = vm.status
        status = previous.model_copy(deep=True)
        status.observed_generation = vm.metadata.generation
        node = previous.node
        running = node is not None and node.domain_state == "running"
        offering, offering_ok = self._offering(vm)
        template, template_ok = self._template(vm)
        zone, zone_ok = self._zone(vm)
        quota_ok = self._quota(vm)
        references = first_failure(quota_ok, zone_ok, offering_ok, template_ok, self._affinity_check(vm))
        root, data = self._volumes(vm)
        wanted = DesiredState.RUNNING if vm.spec.state == DesiredState.RUNNING and not ctx.deleting \
            else DesiredState.STOPPED
        checks: dict[str, Check | None] = {}
        # A guest waiting for quota allocates nothing (no addresses, no root disk, no placement).
        nics = self._allocate_nics(vm, status) if not ctx.deleting and quota_ok.ok else Check.passed()

        if status.migration is not None and status.launch is not None and not ctx.deleting:
            # A live migration moves the guest (controllers.reconcilers.migration owns status.migration and the
            # placement change at its end): the launch stays as it is, a stop waits for the move to end.
            held = status.migration
            ready = Check.passed("Migrating", f"live-migrating from host {held.source_host} to {held.target_host}")
            phase = VmPhase.MIGRATING
        elif wanted == DesiredState.STOPPED or (not first_failure(references, nics).ok and not running):
            if status.launch is not None and not domain_stopped(vm) and not self._fenced(vm):
                status.launch = status.launch.model_copy(update={"power_state": DesiredState.STOPPED})
                phase = VmPhase.STOPPING
            else:
                status.launch, status.placement = None, None
                phase = VmPhase.STOPPED
            if vm.spec.state == DesiredState.DESTROYED:
                status.destroyed_at = previous.destroyed_at or ctx.now
                if phase == VmPhase.STOPPED:
                    phase = VmPhase.DESTROYED
            else:
                status.destroyed_at = None
            ready = references if not references.ok else Check.failed(phase.value, f"the guest is {phase.value}")
            if wanted == DesiredState.RUNNING and not nics.ok:
                ready = references if not references.ok else nics
            checks[SCHEDULED] = quota_ok if wanted == DesiredState.RUNNING and not quota_ok.ok else None
            checks[NETWORK_READY] = nics if vm.spec.nics and not nics.ok else None
        else:
            status.destroyed_at = None
            ready, phase = self._derive_running(vm, status, offering, template, zone, root, data, checks,
                                                first_failure(references, nics))
        if ctx.deleting:
            phase = VmPhase.EXPUNGING
        status.phase = phase.value
        status.ip_address = next((n.ip_address for n in status.launch.nics if n.default), None) \
            if status.launch and status.launch.nics else None
        status.conditions = inventory.conditions(previous.conditions, vm.metadata.generation, ctx, ready, **checks)
        return status

    def _quota(self, vm: VirtualMachine) -> Check:
        """The namespace's Quota admits the guest (see controllers.reconcilers.quota)."""
        quotas = self.runtime.reconcilers.get("quotas")
        return quotas.admission("virtualmachines", vm) if quotas is not None else Check.passed()

    def _affinity_check(self, vm: VirtualMachine) -> Check:
        missing = [g for g in vm.spec.affinity_groups
                   if self.store.get("affinitygroups", g, vm.metadata.namespace) is None]
        if missing:
            return Check.failed("AffinityGroupNotFound", f"AffinityGroup {missing[0]} does not exist")
        return Check.passed()

    def _fenced(self, vm: VirtualMachine) -> bool:
        """Placed on a host found Down: fencing stopped the domain, whatever the last report says."""
        placement = vm.status.placement
        host = self.store.get("hosts", placement.host) if placement and placement.host else None
        return host is not None and host.status.state == HostState.DOWN

    def _ha_enabled(self, vm: VirtualMachine, offering) -> bool:
        return vm.spec.ha_enabled if vm.spec.ha_enabled is not None else bool(offering and offering.spec.offer_ha)

    def _on_down_host(self, vm, status, offering, checks) -> tuple[Check, VmPhase] | None:
        """A guest on a Down host: an HA guest on shared storage loses the placement here (placed again just
        after, in the same status write: one recorded placement change, so a controller restart cannot start it
        twice); the others stay, stopped, with the reason."""
        placement = status.placement
        if placement is None or not placement.host or not self._fenced(vm):
            return None
        root, data = self._volumes(vm)
        pools = [placement.storage_pool, *(v.status.storage_pool for v in [root, *data] if v is not None)]
        local = next((name for name in pools if name and (pool := self.store.get("storagepools", name)) is not None
                      and pool.spec.scope == PoolScope.HOST), None)
        action, check = hainvestigation.on_down_host(placement.host, self._ha_enabled(vm, offering),
                                                     local or placement.storage_pool, local is not None)
        if action == hainvestigation.DownAction.KEEP:
            checks[SCHEDULED] = Check.passed("Scheduled", f"placed on host {placement.host}")
            return check, VmPhase.STOPPED
        status.placement, status.launch = None, None
        return None

    def _derive_running(self, vm, status, offering, template, zone, root, data, checks, references):
        if not references.ok:  # the domain runs, but something it references went away
            checks[SCHEDULED] = None
            checks[NETWORK_READY] = references if references.reason in NIC_REASONS else None
            return references, VmPhase.RUNNING
        down_host = status.placement.host if status.placement and self._fenced(vm) else None
        kept = self._on_down_host(vm, status, offering, checks)
        if kept is not None:
            return kept
        decided = self._decided.get(vm_key(vm))
        if (status.placement is None or status.placement.host is None) and decided is not None and \
                decided[0] == vm.metadata.uid and (held := self.ledger.reservation(vm_key(vm))) is not None and \
                held.host == decided[1].host:
            # Placed a moment ago, and this copy of the guest predates the status saying so (a watch event of
            # an earlier write): the same placement, not a second one elsewhere.
            status.placement = decided[1]
            checks[SCHEDULED] = Check.passed("Scheduled", decided[2])
        elif status.placement is None or status.placement.host is None:
            decision = self._place(vm, offering, template, zone, root)
            if not decision.ok:
                self.placements.failed(vm_key(vm), vm.spec.zone, decision.reason)
                self._waiting_for_capacity.add((vm.metadata.namespace, vm.metadata.name))
                checks[SCHEDULED] = Check.failed(decision.reason, decision.message)
                return checks[SCHEDULED], VmPhase.STARTING
            self._waiting_for_capacity.discard((vm.metadata.namespace, vm.metadata.name))
            host = self.store.get("hosts", decision.host)
            status.placement = Placement(zone=vm.spec.zone, pod=host.status.pod, cluster=host.spec.cluster,
                                         host=decision.host, storage_pool=decision.pool)
            self.ledger.reserve(vm_key(vm), decision.host, offering.spec.cpu_number, offering.spec.memory_mib,
                                vm.metadata.namespace)
            self.placements.placed(vm_key(vm), vm.spec.zone)
            message = decision.message
            if down_host is not None:
                message = f"HA restart: host {down_host} is Down; {message}"
                metrics.HA_RESTARTS.inc()
            checks[SCHEDULED] = Check.passed("Scheduled", message)
            self._decided[vm_key(vm)] = (vm.metadata.uid, status.placement, message)
        else:
            self._decided.pop(vm_key(vm), None)  # the status holds it now
            previous = find(vm.status.conditions, SCHEDULED)
            checks[SCHEDULED] = Check.passed("Scheduled", previous.message if previous else
                                             f"placed on host {status.placement.host}")
        node = vm.status.node
        running_here = node is not None and node.domain_state == "running" and node.host == status.placement.host
        # Where a root disk still being created goes: asked of the volume reconciler at most once per derive,
        # though both the storage check and the launch need it.
        root_target = functools.cache(lambda: self._root_target(root))
        # A running guest only needs its root disk; a data disk being created or grown does not stop it.
        storage = self._storage_check(root, [] if running_here else data, status.placement.host, root_target)
        checks[STORAGE_READY] = storage
        network = self._network_check(vm, status)
        checks[NETWORK_READY] = network
        # A running guest keeps running while its network re-implements (a router moving hosts).
        if not storage.ok or (not network.ok and not running_here):
            return first_failure(storage, network), VmPhase.STARTING
        status.launch = self._launch(vm, offering, template, root, data, status.placement.host, status, root_target)
        if running_here:
            return Check.passed("Running", f"running on host {status.placement.host}"), VmPhase.RUNNING
        if node is not None and node.message:
            return Check.failed("StartFailed", node.message), VmPhase.STARTING
        return Check.failed("Starting", f"the agent of {status.placement.host} is starting the guest"), \
            VmPhase.STARTING

    def _storage_check(self, root, data, host: str, root_target: t.Callable[[], t.Any]) -> Check:
        """StorageReady: every disk is on a pool the host reaches and none has failed. A root disk the agent is
        still creating passes once its target is known (the launch carries it; the agent creates the disk before
        the domain starts), so the guest's status does not change again when the disk appears."""
        if root is None:
            return Check.failed("CreatingRootVolume", "creating the root volume")
        for volume in [root, *data]:
            ready = find(volume.status.conditions, "Ready")
            if volume is root and (ready is None or (ready.status.value != "True" and ready.reason in VOLUME_PROGRESS)):
                if root_target() is None:
                    return Check.failed("CreatingRootVolume", "creating the root volume")
                continue
            if ready is None or ready.status.value != "True":
                why = ready.message if ready else "not reconciled yet"
                if volume is root or volume.status.storage_pool:
                    return Check.failed("VolumeNotReady", f"Volume {volume.metadata.name}: {why}")
        if root.status.host and root.status.host != host:
            return Check.failed("RootDiskElsewhere", f"the root disk is on host {root.status.host}")
        return Check.passed("VolumesReady")

    def _root_target(self, root) -> t.Any:
        """Where the root disk goes (pool, path, format, size, Ceph access): what the volume's status says once
        its reconciler recorded it, else what it will record; None while that is not known yet."""
        if root.status.path:
            return root.status
        return self.runtime.reconcilers["volumes"].planned_target(root)

    # -- NICs ---------------------------------------------------------------------------------------

    @property
    def networks(self) -> t.Any:
        return self.runtime.reconcilers["networks"]

    def _nic_network(self, vm: VirtualMachine, nic) -> tuple[t.Any, t.Any, Check]:
        namespace = nic.network.namespace or vm.metadata.namespace
        key = network_key(namespace, nic.network.name)
        network = self.store.get("networks", nic.network.name, namespace)
        if network is None or network.metadata.deletion_timestamp is not None:
            return None, None, Check.failed("NetworkNotFound", f"Network {key} does not exist")
        offering = self.store.get("networkofferings", network.spec.network_offering)
        if offering is None:
            return None, None, Check.failed("NetworkNotReady", f"Network {key}: NetworkOffering "
                                                               f"{network.spec.network_offering} does not exist")
        if namespace != vm.metadata.namespace:
            shared = network.spec.shared_with
            if offering.spec.guest_ip_type != GuestIpType.SHARED or shared is None or not (
                    shared.all_namespaces or vm.metadata.namespace in shared.namespaces):
                return None, None, Check.failed("NetworkNotVisible", f"Network {key} is not shared with namespace "
                                                                     f"{vm.metadata.namespace}")
        if network.spec.zone != vm.spec.zone:
            return None, None, Check.failed("NetworkInOtherZone", f"Network {key} is in zone {network.spec.zone}")
        return network, offering, Check.passed()

    def _allocate_nics(self, vm: VirtualMachine, status: VirtualMachineStatus) -> Check:
        """Give each NIC its MAC and (except on L2 networks) its address, kept in ``status.nics`` for the
        guest's life; NICs taken out of the spec give theirs back."""
        owner = nic_owner(vm)
        previous = {nic.network: nic for nic in status.nics}
        wanted = nic_networks(vm)
        for key, nic in previous.items():
            if key not in wanted:
                network = self.store.get("networks", *reversed(key.split("/", 1)))
                pool = self.networks.addresses.get(key) if network is None else self.networks.address_pool(network)
                if pool is not None and pool.address(owner) == nic.ip_address:
                    pool.release(owner)
        nics, failure = [], None
        for index, request in enumerate(vm.spec.nics):
            key = wanted[index]
            network, offering, found = self._nic_network(vm, request)
            old = previous.get(key)
            if not found.ok:
                failure = failure or found
                if old is not None:
                    nics.append(old)
                continue
            mac = request.mac_address or (old.mac_address if old else None) or ipam.mac_address(
                f"{vm.metadata.uid}/{network.metadata.uid}")
            address = None
            pool = self.networks.address_pool(network)
            if pool is not None:
                try:
                    address = pool.allocate_address(owner, request.ip_address)
                except ipam.AllocationError as error:
                    reason = {"Exhausted": "InsufficientAddressCapacity"}.get(error.reason, f"IpAddress{error.reason}")
                    failure = failure or Check.failed(reason, f"no address on network {key}: {error.message}")
                    address = old.ip_address if old and pool.address(owner) == old.ip_address else None
            nics.append(NicStatus(network=key, device_id=index, mac_address=mac, ip_address=address))
        status.nics = nics
        return failure or Check.passed()

    def _network_check(self, vm: VirtualMachine, status: VirtualMachineStatus) -> Check:
        if not vm.spec.nics:
            return Check.passed("NoNics")
        for nic in status.nics:
            namespace, _, name = nic.network.partition("/")
            network = self.store.get("networks", name, namespace)
            if network is None:
                return Check.failed("NetworkNotFound", f"Network {nic.network} does not exist")
            offering = self.store.get("networkofferings", network.spec.network_offering)
            pnet = self.store.get("physicalnetworks", network.status.physical_network)
            if offering is not None and pnet is not None and offers(offering, NetworkService.SECURITY_GROUP) and \
                    pnet.spec.vswitch.value != "linuxbridge":
                return Check.failed("SecurityGroupsNotSupported",
                                    f"Network {nic.network} offers security groups, which hosts enforce on Linux "
                                    f"bridge ports only; PhysicalNetwork {pnet.metadata.name} uses "
                                    f"{pnet.spec.vswitch.value}")
            if network.status.phase != NetworkPhase.IMPLEMENTED:
                implemented = find(network.status.conditions, "Implemented")
                why = implemented.message if implemented and implemented.reason != "NotNeeded" else "not yet"
                return Check.failed("NetworkImplementing", f"waiting for network {nic.network} to be implemented: "
                                                           f"{why}")
        security = self._security_check(vm)
        if not security.ok:
            return security
        return Check.passed("NetworksImplemented")

    def _security_check(self, vm: VirtualMachine) -> Check:
        missing = [g for g in vm.spec.security_groups
                   if self.store.get("securitygroups", g, vm.metadata.namespace) is None]
        if missing:
            return Check.failed("SecurityGroupNotFound", f"SecurityGroup {missing[0]} does not exist")
        return Check.passed()

    def _peers(self, vm: VirtualMachine) -> list:
        """Guests whose security rules list this guest's addresses (members of its groups, or naming them)."""
        return [key for name in vm.spec.security_groups
                if (group := self.store.get("securitygroups", name, vm.metadata.namespace)) is not None
                for key in self._security_group_users(group) if key[2] != vm.metadata.name]

    def _security_group_users(self, group) -> list:
        """Guests in the group, and guests whose groups' rules name it (their rules list its members)."""
        namespace = group.metadata.namespace
        names = {group.metadata.name} | {g.metadata.name for g in self.store.list("securitygroups")
                                         if g.metadata.namespace == namespace and any(
                                             group.metadata.name in r.security_groups
                                             for r in [*g.spec.ingress, *g.spec.egress])}
        return [self.key(vm.metadata.name, namespace) for name in sorted(names)
                for vm in self.store.by("virtualmachines", "security-group", network_key(namespace, name))]

    def _security_policy(self, vm: VirtualMachine) -> SecurityGroupPolicy:
        """The guest's groups resolved to addresses: rules naming other groups list those groups' members."""
        namespace = vm.metadata.namespace

        def members(group: str) -> list[str]:
            return sorted(f"{nic.ip_address}/32" for other in self.store.by("virtualmachines", "security-group",
                                                                           network_key(namespace, group))
                          for nic in other.status.nics if nic.ip_address)

        def resolve(rules) -> list[TrafficRule]:
            resolved = []
            for rule in rules:
                cidrs = [*rule.cidrs, *(m for g in rule.security_groups for m in members(g))]
                if rule.security_groups and not cidrs:
                    continue  # the named groups have no members yet: the rule allows nobody (not everybody)
                resolved.append(traffic_rule(rule).model_copy(update={"cidrs": cidrs}))
            return resolved

        groups = [g for name in vm.spec.security_groups
                  if (g := self.store.get("securitygroups", name, namespace)) is not None]
        ingress = resolve(r for g in groups for r in g.spec.ingress)
        egress_rules = [r for g in groups for r in g.spec.egress]
        return SecurityGroupPolicy(ingress=ingress, egress=resolve(egress_rules), egress_default_allow=not egress_rules,
                                   groups=[g.metadata.name for g in groups])

    def _launch_nics(self, vm: VirtualMachine, status: VirtualMachineStatus) -> list[LaunchNic]:
        default = next((i for i, n in enumerate(vm.spec.nics) if n.default), 0)
        nics = []
        for nic in status.nics:
            namespace, _, name = nic.network.partition("/")
            network = self.store.get("networks", name, namespace)
            pnet = self.store.get("physicalnetworks", network.status.physical_network) if network else None
            offering = self.store.get("networkofferings", network.spec.network_offering) if network else None
            segment = guest_segment(pnet, network.status.broadcast_uri) if pnet else None
            if segment is None:
                continue
            rate = offering.spec.network_rate_mbps if offering else None
            nics.append(LaunchNic(
                network=nic.network, device_id=nic.device_id, mac_address=nic.mac_address, ip_address=nic.ip_address,
                gateway=network.status.gateway, cidr=network.status.cidr, bridge=segment.bridge,
                broadcast_uri=segment.broadcast_uri, vswitch=segment.vswitch, traffic_label=segment.traffic_label,
                mtu=segment.mtu, default=nic.device_id == default, rate_mbps=rate,
                security_groups=self._security_policy(vm) if offering and offers(
                    offering, NetworkService.SECURITY_GROUP) else None))
        return nics

    def _launch(self, vm, offering, template, root, data, host: str, status: VirtualMachineStatus,
                root_target: t.Callable[[], t.Any]) -> LaunchSpec:
        attached = set(vm.status.node.disks) if vm.status.node else set()
        previous = {d.volume: d.device for d in vm.status.launch.disks} if vm.status.launch else {}

        def usable(volume) -> bool:
            ready = find(volume.status.conditions, "Ready")
            # An attached disk stays while it grows (Resizing); dropping it would detach it mid-resize.
            return (ready is not None and ready.status.value == "True") or volume.metadata.name in attached

        chosen = [root, *[d for d in data if usable(d)]]
        # A disk keeps its device name for as long as it stays attached; new ones take the first free name.
        taken = {"vda"} | {previous[v.metadata.name] for v in chosen if v.metadata.name in previous}
        free = (f"vd{chr(ord('a') + i)}" for i in range(26) if f"vd{chr(ord('a') + i)}" not in taken)
        disks = []
        for volume in chosen:
            device = "vda" if volume is root else previous.get(volume.metadata.name) or next(free)
            target = volume.status if volume.status.path or volume is not root else root_target()
            pool = self.store.get("storagepools", target.storage_pool)
            rbd = target.rbd
            disks.append(LaunchDisk(
                volume=volume.metadata.name, device=device, pool=target.storage_pool,
                pool_type=pool.spec.type.value if pool else "Filesystem",
                path=f"{rbd.pool}/{target.path}" if rbd else target.path,
                format=target.format or "qcow2", size_bytes=target.size_bytes or 0, rbd=rbd))
        copy = next(c for c in template.status.zones if c.zone == vm.spec.zone)
        kernel = template.spec.direct_kernel_boot
        return LaunchSpec(
            host=host, cpu_number=offering.spec.cpu_number, cpu_speed_mhz=offering.spec.cpu_speed_mhz,
            memory_mib=offering.spec.memory_mib, limit_cpu_use=offering.spec.limit_cpu_use,
            os_type=template.spec.os_type, disks=disks, nics=self._launch_nics(vm, status),
            kernel_path=f"{copy.path}.kernel" if kernel else None,
            initrd_path=f"{copy.path}.initrd" if kernel and kernel.initrd else None,
            kernel_cmdline=kernel.cmdline if kernel else None,
            power_state=DesiredState.RUNNING, user_data=vm.spec.user_data,
            # A reference only: the agent reads the Secret itself, so its content never lands in this object.
            user_data_secret=SecretKeyReference(
                namespace=vm.metadata.namespace, name=vm.spec.user_data_secret_ref.name, key=USER_DATA_KEY)
            if vm.spec.user_data_secret_ref else None,
            ssh_public_keys=list(vm.spec.ssh_public_keys), hostname=vm.spec.hostname or vm.metadata.name,
            ha_enabled=self._ha_enabled(vm, offering),
        )

    # -- actions ------------------------------------------------------------------------------

    def first_labels(self, vm: VirtualMachine, status: VirtualMachineStatus) -> dict[str, str]:
        host = status.placement.host if status.placement else None
        return {HOST_LABEL: host} if host and vm.metadata.labels.get(HOST_LABEL) != host else {}

    async def act(self, vm: VirtualMachine, status: VirtualMachineStatus) -> None:
        api = self.runtime.api
        host = status.placement.host if status.placement else None
        if vm.metadata.labels.get(HOST_LABEL) != host and (host or domain_stopped(vm) or self._fenced(vm)):
            await api.set_label(self.kind, vm.metadata.name, vm.metadata.namespace, HOST_LABEL, host)
        if status.placement is None:
            self.ledger.release(vm_key(vm))
            self._decided.pop(vm_key(vm), None)
        # A guest prepare gave none (not placed: no host for it yet) gets its root Volume here.
        if await self._ensure_root_volume(vm, status.placement) is not None:
            return
        root, _ = self._volumes(vm)
        if root is not None and not root.spec.storage_pool and status.placement and status.placement.storage_pool:
            await api.patch(kinds.VOLUMES, root.metadata.name, root.metadata.namespace,
                            {"spec": {"storagePool": status.placement.storage_pool}})

    async def prepare(self, vm: VirtualMachine, status: VirtualMachineStatus, ctx: inventory.Context) -> \
            VirtualMachineStatus:
        """A guest placed just now gets its root Volume before the placement is recorded, so that one status
        write carries both the placement and the launch (with the root disk's target): the agent creates the
        disk and starts the domain without waiting for two more controller writes. A crash in between leaves a
        root Volume naming the planner's pool; the next placement keeps to that pool (``_place``)."""
        placement = status.placement
        if placement is None or not placement.host or not placement.storage_pool or vm.status.placement is not None:
            return status  # not placed just now: act creates the root Volume if the guest still has none
        created = await self._ensure_root_volume(vm, placement)
        if created is None:
            return status  # nothing to create, or it existed already (its watch event brings it)
        self.runtime.observe("volumes", "ADDED", created)
        return self.derive(vm, ctx)

    async def _ensure_root_volume(self, vm: VirtualMachine, placement: Placement | None) -> dict | None:
        """The one rule for creating a guest's root Volume (from ``prepare`` for a guest placed just now, from
        ``act`` otherwise): the guest should run, its quota admits it and it has no root Volume yet. The created
        object, or None when nothing was created."""
        if deleting(vm) or vm.spec.state != DesiredState.RUNNING or self._volumes(vm)[0] is not None or \
                self.store.get("volumes", root_volume_name(vm), vm.metadata.namespace) is not None or \
                not self._quota(vm).ok:
            return None
        return await self.runtime.api.create(kinds.VOLUMES, self._root_volume(vm, placement))

    def _root_volume(self, vm: VirtualMachine, placement: Placement | None = None) -> dict:
        """The root Volume, created as its reconciler would leave it after its first steps when the guest is
        placed: with the finalizer, the planner's pool and the host label (three writes fewer per guest; without
        the pool, the volume's first reconcile finds no pool for it and says so, in a status write and an Event
        on the volume and on the guest). The placement does not move after this: a reconcile of a stale copy of
        the guest keeps the placement just decided (``_decided``)."""
        offering = self.store.get("serviceofferings", vm.spec.service_offering)
        size = vm.spec.root_disk_size_gib or (offering.spec.root_disk_size_gib if offering else None)
        spec: dict[str, t.Any] = {
            "type": "ROOT", "zone": vm.spec.zone, "virtualMachine": {"name": vm.metadata.name},
            "fromTemplate": {"name": vm.spec.template.name,
                             "namespace": vm.spec.template.namespace or vm.metadata.namespace},
        }
        if size:
            spec["sizeGiB"] = size
        metadata: dict[str, t.Any] = {
            "name": root_volume_name(vm), "namespace": vm.metadata.namespace, "finalizers": [FINALIZER],
            "ownerReferences": [{"apiVersion": API_VERSION, "kind": "VirtualMachine", "name": vm.metadata.name,
                                 "uid": vm.metadata.uid, "controller": True, "blockOwnerDeletion": True}]}
        if placement is not None and placement.host and placement.storage_pool:
            spec["storagePool"] = placement.storage_pool
            # The disk's host is the guest's: a local pool's own host, or the host that reaches a shared one.
            metadata["labels"] = {HOST_LABEL: placement.host}
        return {"apiVersion": API_VERSION, "kind": "Volume", "metadata": metadata, "spec": spec}

    def requeue(self, vm: VirtualMachine) -> Result:
        if vm.spec.state == DesiredState.DESTROYED and vm.status.destroyed_at is not None:
            due = vm.status.destroyed_at + datetime.timedelta(seconds=vm.spec.expunge_delay_seconds)
            return Result(max((due - utcnow()).total_seconds(), 0) + 0.5)
        return Result()

    async def reconcile(self, vm: VirtualMachine) -> Result:
        # Placement latency counts from the first reconcile of a guest that should run and has no host.
        if vm.spec.state == DesiredState.RUNNING and not deleting(vm):
            if not (vm.status.placement and vm.status.placement.host):
                self.placements.waiting(vm_key(vm))
        else:
            self.placements.forget(vm_key(vm))
        if not deleting(vm) and vm.spec.state == DesiredState.DESTROYED and vm.status.destroyed_at is not None \
                and domain_stopped(vm):
            due = vm.status.destroyed_at + datetime.timedelta(seconds=vm.spec.expunge_delay_seconds)
            if utcnow() >= due:
                await self.runtime.api.delete(self.kind, vm.metadata.name, vm.metadata.namespace)
                return Result()
        return await super().reconcile(vm)

    async def finalize(self, vm: VirtualMachine) -> bool:
        """Expunge: the domain is stopped (derive asks the agent), the root disk deleted, capacity released."""
        if not domain_stopped(vm) and not self._fenced(vm):
            return False
        root, _ = self._volumes(vm)
        if root is not None:
            if root.metadata.deletion_timestamp is None:
                await self.runtime.api.delete(kinds.VOLUMES, root.metadata.name, root.metadata.namespace)
            return False
        self.ledger.release(vm_key(vm))
        self._decided.pop(vm_key(vm), None)
        for nic in vm.status.nics:
            pool = self.networks.addresses.get(nic.network)
            if pool is not None and pool.address(nic_owner(vm)) == nic.ip_address:
                pool.release(nic_owner(vm))
        return True
