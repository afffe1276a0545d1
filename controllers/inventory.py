"""Pure status derivation for the infrastructure kinds (no kopf, no I/O).

Each ``*_status`` function takes the object and the parts of the world it depends on, already looked
up, and returns the status the controller should record. Capacity rolls up through statuses: a
host's from its agent's facts and its guests, a cluster's from its hosts, a pod's from its clusters,
a zone's from its pods, with primary storage added at the level each pool is scoped to.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import typing as t

from controllers.api.v1alpha1.cluster import Cluster, ClusterStatus
from controllers.api.v1alpha1.common import AllocationState, Capacity, CapacityFigure, Condition
from controllers.api.v1alpha1.host import Host, HostState, HostStatus, ResourceState
from controllers.api.v1alpha1.hostpod import HostPod, HostPodStatus
from controllers.api.v1alpha1.imagestore import ImageStore, ImageStoreStatus
from controllers.api.v1alpha1.physicalnetwork import PhysicalNetwork, PhysicalNetworkStatus
from controllers.api.v1alpha1.storagepool import PoolHostAccess, PoolScope, PoolState, StoragePool, StoragePoolStatus
from controllers.api.v1alpha1.virtualmachine import VirtualMachine
from controllers.api.v1alpha1.volume import Volume
from controllers.api.v1alpha1.zone import Zone, ZoneStatus
from controllers.conditions import DELETION_BLOCKED, READY, Check, first_failure, merge
from controllers.migration import Evacuation, maintenance_state

GIB = 1024**3
ENABLED = AllocationState.ENABLED
DISABLED = AllocationState.DISABLED


@dataclasses.dataclass(frozen=True)
class Context:
    """What every derivation needs besides the world: the clock and the object's deletion state."""

    now: datetime.datetime
    blocked_by: tuple[str, ...] = ()
    """Dependents holding a deletion back ("HostPod pod1", ...); empty when not deleting or free to go."""
    deleting: bool = False


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


def parent_check(kind: str, name: str | None, parent: t.Any, effective: AllocationState | None) -> Check:
    """A child is Ready only under an existing, enabled parent."""
    if name is None:
        return Check.passed()
    if parent is None:
        return Check.failed(f"{kind}NotFound", f"{kind} {name} does not exist; this becomes Ready once it does")
    if effective == DISABLED:
        return Check.failed(f"{kind}Disabled", f"{kind} {name} is Disabled, so nothing new is placed below it")
    return Check.passed()


def allocation_check(own: AllocationState) -> Check:
    if own == DISABLED:
        return Check.failed("Disabled", "allocationState is Disabled: no new placements here")
    return Check.passed()


def effective_allocation(own: AllocationState, *checks: Check) -> AllocationState:
    return ENABLED if own == ENABLED and all(check.ok for check in checks) else DISABLED


def deletion_check(ctx: Context) -> Check | None:
    if not ctx.blocked_by:
        return None
    shown = ", ".join(ctx.blocked_by[:10]) + (f" and {len(ctx.blocked_by) - 10} more" if len(ctx.blocked_by) > 10 else "")
    return Check(True, "DependentsExist", f"deletion waits until these are deleted: {shown}")


def conditions(previous: list[Condition], generation: int | None, ctx: Context, ready: Check,
               **extra: Check | None) -> list[Condition]:
    wanted: dict[str, Check | None] = {READY: ready, DELETION_BLOCKED: deletion_check(ctx), **extra}
    return merge(previous, wanted, generation, ctx.now)


def phase(ctx: Context, ready: Check, ready_phase: str = "Ready") -> str:
    if ctx.deleting:
        return "Deleting"
    if ready.ok:
        return ready_phase
    return "Disabled" if ready.reason.endswith("Disabled") else "NotReady"


def total(figures: t.Iterable[CapacityFigure | None]) -> CapacityFigure:
    result = CapacityFigure()
    for figure in figures:
        if figure is not None:
            result = CapacityFigure(total=result.total + figure.total, allocated=result.allocated + figure.allocated)
    return result


def sum_capacity(capacities: t.Iterable[Capacity | None], extra_storage: CapacityFigure | None = None) -> Capacity:
    capacities = [c for c in capacities if c is not None]
    return Capacity(
        cpu_cores=total(c.cpu_cores for c in capacities),
        memory_mib=total(c.memory_mib for c in capacities),
        primary_storage_gib=total([*(c.primary_storage_gib for c in capacities), extra_storage]),
    )


def pool_storage(pools: t.Iterable[StoragePool]) -> CapacityFigure:
    """Primary storage of pools in GiB: capacity after overprovisioning, and what volumes take."""
    figure = CapacityFigure()
    for pool in pools:
        capacity = (pool.status.capacity_bytes or 0) * pool.spec.overprovisioning_factor
        figure = CapacityFigure(
            total=figure.total + int(capacity // GIB),
            allocated=figure.allocated + math.ceil((pool.status.allocated_bytes or 0) / GIB),
        )
    return figure


# ---------------------------------------------------------------------------------------------
# Zone, pod, cluster
# ---------------------------------------------------------------------------------------------


def zone_status(zone: Zone, pods: list[HostPod], hosts: int, zone_pools: list[StoragePool], ctx: Context) -> ZoneStatus:
    ready = allocation_check(zone.spec.allocation_state)
    return ZoneStatus(
        observed_generation=zone.metadata.generation,
        phase=phase(ctx, ready),
        conditions=conditions(zone.status.conditions, zone.metadata.generation, ctx, ready),
        capacity=sum_capacity((pod.status.capacity for pod in pods), pool_storage(zone_pools)),
        pods=len(pods),
        hosts=hosts,
    )


def hostpod_status(pod: HostPod, zone: Zone | None, clusters: list[Cluster], ctx: Context) -> HostPodStatus:
    parent = parent_check("Zone", pod.spec.zone, zone, zone.spec.allocation_state if zone else None)
    own = allocation_check(pod.spec.allocation_state)
    ready = first_failure(parent, own)
    return HostPodStatus(
        observed_generation=pod.metadata.generation,
        phase=phase(ctx, ready),
        conditions=conditions(pod.status.conditions, pod.metadata.generation, ctx, ready),
        effective_allocation_state=effective_allocation(pod.spec.allocation_state, parent),
        capacity=sum_capacity(cluster.status.capacity for cluster in clusters),
        clusters=len(clusters),
    )


def cluster_status(cluster: Cluster, pod: HostPod | None, hosts: list[Host], cluster_pools: list[StoragePool],
                   ctx: Context) -> ClusterStatus:
    parent = parent_check("HostPod", cluster.spec.pod, pod, pod.status.effective_allocation_state if pod else None)
    own = allocation_check(cluster.spec.allocation_state)
    ready = first_failure(parent, own)
    return ClusterStatus(
        observed_generation=cluster.metadata.generation,
        phase=phase(ctx, ready),
        conditions=conditions(cluster.status.conditions, cluster.metadata.generation, ctx, ready),
        effective_allocation_state=effective_allocation(cluster.spec.allocation_state, parent),
        zone=pod.spec.zone if pod else None,
        capacity=sum_capacity((host.status.capacity for host in hosts), pool_storage(cluster_pools)),
        hosts=len(hosts),
    )


# ---------------------------------------------------------------------------------------------
# Host
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Guest:
    """What one guest placed on a host holds there."""

    cpu: int
    memory_mib: int


def guest_of(vm: VirtualMachine, offering: t.Any) -> Guest:
    """A placed guest holds its launch's size, or its offering's until the launch is written."""
    if vm.status.launch is not None:
        return Guest(vm.status.launch.cpu_number, vm.status.launch.memory_mib)
    if offering is not None:
        return Guest(offering.spec.cpu_number, offering.spec.memory_mib)
    return Guest(0, 0)


def host_capacity(host: Host, cluster: Cluster | None, guests: list[Guest],
                  local_pools: list[StoragePool]) -> Capacity:
    node = host.status.node
    cpu_ratio = cluster.spec.cpu_overcommit_ratio if cluster else 1.0
    memory_ratio = cluster.spec.memory_overcommit_ratio if cluster else 1.0
    cpus, memory = sum(g.cpu for g in guests), sum(g.memory_mib for g in guests)
    return Capacity(
        cpu_cores=CapacityFigure(total=int((node.cpu_cores or 0) * cpu_ratio) if node else 0, allocated=cpus),
        memory_mib=CapacityFigure(total=int((node.memory_mib or 0) * memory_ratio) if node else 0, allocated=memory),
        primary_storage_gib=pool_storage(local_pools),
    )


def resource_state(host: Host, guests: int, evacuating: Evacuation | None = None) -> ResourceState:
    """Maintenance is reached once the host runs no guests; live migrations move them away meanwhile
    (controllers.migration), and a guest that cannot move makes it ErrorInMaintenance."""
    state = maintenance_state(host.spec.maintenance, guests, evacuating)
    if state is not None:
        return state
    return ResourceState.ENABLED if host.spec.allocation_state == ENABLED else ResourceState.DISABLED


def maintenance_check(state: ResourceState, evacuating: Evacuation | None) -> Check | None:
    """The Maintenance condition: how evacuation stands, naming the guests that cannot move and why."""
    if state == ResourceState.MAINTENANCE:
        return Check.passed("InMaintenance", "no guests left on the host")
    if state not in (ResourceState.PREPARE_FOR_MAINTENANCE, ResourceState.ERROR_IN_MAINTENANCE):
        return None
    if evacuating is not None and evacuating.unmovable:
        shown = "; ".join(f"{name}: {why}" for name, why in evacuating.unmovable[:10])
        return Check.failed("CannotEvacuate", f"{len(evacuating.unmovable)} guest(s) cannot be live-migrated away: "
                                              f"{shown}")
    moving = evacuating.moving + len(evacuating.to_migrate) if evacuating else 0
    return Check.failed("Evacuating", f"live-migrating {moving} guest(s) away")


def host_status(host: Host, cluster: Cluster | None, connection: tuple[HostState, Check], guests: list[Guest],
                local_pools: list[StoragePool], ctx: Context, evacuating: Evacuation | None = None) -> HostStatus:
    state, heartbeat = connection
    parent = parent_check("Cluster", host.spec.cluster, cluster,
                          cluster.status.effective_allocation_state if cluster else None)
    node = host.status.node
    if node is None or node.hypervisor_healthy is None:
        hypervisor = Check.failed("NotReported", "the host's agent has not reported its hypervisor yet")
    elif node.hypervisor_healthy:
        hypervisor = Check.passed("Healthy")
    else:
        hypervisor = Check.failed("HypervisorError", node.message or "the hypervisor reported an error")
    resources = resource_state(host, len(guests), evacuating)
    if resources in (ResourceState.MAINTENANCE, ResourceState.PREPARE_FOR_MAINTENANCE,
                     ResourceState.ERROR_IN_MAINTENANCE):
        own = Check.failed("InMaintenance" if resources == ResourceState.MAINTENANCE else "PreparingForMaintenance",
                           f"the host is in {resources.value}: no new placements")
    else:
        own = allocation_check(host.spec.allocation_state)
    ready = first_failure(parent, heartbeat, hypervisor, own)
    return HostStatus(
        observed_generation=host.metadata.generation,
        phase=state.value if not ctx.deleting else "Deleting",
        conditions=conditions(host.status.conditions, host.metadata.generation, ctx, ready,
                              Heartbeat=heartbeat, HypervisorHealthy=hypervisor,
                              Maintenance=maintenance_check(resources, evacuating)),
        state=state,
        resource_state=resources,
        effective_allocation_state=effective_allocation(host.spec.allocation_state, parent, own),
        zone=cluster.status.zone if cluster else None,
        pod=cluster.spec.pod if cluster else None,
        capacity=host_capacity(host, cluster, guests, local_pools),
        virtual_machines=len(guests),
        node=node,
    )


# ---------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------


def pool_status(pool: StoragePool, zone: Zone | None, scope_object: t.Any, hosts: list[Host],
                volumes: list[Volume], ctx: Context) -> StoragePoolStatus:
    scope_kind = {PoolScope.HOST: "Host", PoolScope.CLUSTER: "Cluster", PoolScope.ZONE: "Zone"}[pool.spec.scope]
    scope_name = {PoolScope.HOST: pool.spec.host, PoolScope.CLUSTER: pool.spec.cluster,
                  PoolScope.ZONE: pool.spec.zone}[pool.spec.scope]
    zone_ok = parent_check("Zone", pool.spec.zone, zone, zone.spec.allocation_state if zone else None)
    scope_ok = parent_check(scope_kind, scope_name, scope_object, None) if pool.spec.scope != PoolScope.ZONE \
        else Check.passed()
    access: dict[str, PoolHostAccess] = {}
    capacity = used = None
    for host in hosts:
        report = host.status.node.storage_pools.get(pool.metadata.name) if host.status.node else None
        if report is None:
            continue
        previous = pool.status.host_access.get(host.metadata.name)
        unchanged = previous is not None and (previous.reachable, previous.message) == (report.reachable, report.message)
        access[host.metadata.name] = PoolHostAccess(
            reachable=report.reachable, message=report.message,
            checked_at=previous.checked_at if unchanged else (host.status.node.reported_at or ctx.now),
        )
        if report.reachable and capacity is None:
            capacity, used = report.capacity_bytes, report.used_bytes
    if pool.spec.capacity_gib is not None:
        capacity = pool.spec.capacity_gib * GIB
    reachable = [name for name, a in access.items() if a.reachable]
    if not access:
        reach = Check.failed("NotReported", "no agent of a host that can use this pool has reported on it yet")
    elif not reachable:
        first = next(iter(access.items()))
        reach = Check.failed("Unreachable", f"no host can use the pool; {first[0]}: {first[1].message}")
    else:
        reach = Check.passed("Reachable", f"usable from {len(reachable)} of {len(access)} hosts")
    enabled = Check.passed() if pool.spec.enabled else Check.failed("Disabled", "the pool is disabled: no new volumes")
    ready = first_failure(zone_ok, scope_ok, reach, enabled)
    if not pool.spec.enabled:
        state = PoolState.DISABLED
    elif reachable:
        state = PoolState.UP
    else:
        state = PoolState.ERROR if access else None
    return StoragePoolStatus(
        observed_generation=pool.metadata.generation,
        phase=phase(ctx, ready),
        conditions=conditions(pool.status.conditions, pool.metadata.generation, ctx, ready, Reachable=reach),
        state=state,
        capacity_bytes=capacity,
        used_bytes=used,
        allocated_bytes=sum(volume.status.size_bytes or 0 for volume in volumes),
        volumes=len(volumes),
        host_access=access,
    )


def image_store_status(store: ImageStore, zone: Zone | None, hosts: list[Host], templates: int, snapshots: int,
                       ctx: Context) -> ImageStoreStatus:
    zone_ok = parent_check("Zone", store.spec.zone, zone, zone.spec.allocation_state if zone else None)
    reports = {host.metadata.name: host.status.node.image_stores[store.metadata.name] for host in hosts
               if host.status.node and store.metadata.name in host.status.node.image_stores}
    usable = {name: r for name, r in reports.items() if r.reachable}
    if not reports:
        reach = Check.failed("NotReported", "no agent in the zone has reported on this store yet")
    elif not usable:
        name, report = next(iter(reports.items()))
        reach = Check.failed("Unreachable", f"no host can use the store; {name}: {report.message}")
    elif len(usable) < len(reports):
        missing = sorted(set(reports) - set(usable))
        reach = Check.failed("PartlyUnreachable", f"hosts that cannot use the store: {', '.join(missing)}")
    else:
        reach = Check.passed("Reachable", f"usable from all {len(usable)} hosts that reported")
    ready = first_failure(zone_ok, reach)
    sample = next(iter(usable.values()), None)
    return ImageStoreStatus(
        observed_generation=store.metadata.generation,
        phase=phase(ctx, ready),
        conditions=conditions(store.status.conditions, store.metadata.generation, ctx, ready),
        capacity_bytes=sample.capacity_bytes if sample else None,
        used_bytes=sample.used_bytes if sample else None,
        templates=templates,
        snapshots=snapshots,
    )


# ---------------------------------------------------------------------------------------------
# Physical network
# ---------------------------------------------------------------------------------------------


def ipv4_to_int(address: str) -> int:
    a, b, c, d = (int(part) for part in address.split("."))
    return (a << 24) | (b << 16) | (c << 8) | d


def physical_network_status(network: PhysicalNetwork, zone: Zone | None, hosts: list[Host], vnets_allocated: int,
                            public_ips_allocated: int, ctx: Context) -> PhysicalNetworkStatus:
    zone_ok = parent_check("Zone", network.spec.zone, zone, zone.spec.allocation_state if zone else None)
    missing = []
    for host in hosts:
        bridges = host.status.node.bridges if host.status.node else {}
        for traffic in network.spec.traffic_types:
            if bridges.get(traffic.label) is False:
                missing.append(f"{traffic.label} ({traffic.type.value}) on {host.metadata.name}")
    bridges_ok = Check.failed("BridgeMissing", "missing bridges: " + ", ".join(missing)) if missing \
        else Check.passed("BridgesPresent")
    enabled = Check.passed() if network.spec.enabled else Check.failed("Disabled", "the physical network is disabled")
    ready = first_failure(zone_ok, bridges_ok, enabled)
    return PhysicalNetworkStatus(
        observed_generation=network.metadata.generation,
        phase=phase(ctx, ready),
        conditions=conditions(network.status.conditions, network.metadata.generation, ctx, ready,
                              BridgesPresent=bridges_ok),
        vnets_total=sum(r.end - r.start + 1 for r in network.spec.vnet_ranges),
        vnets_allocated=vnets_allocated,
        public_ips_total=sum(ipv4_to_int(r.end_ip) - ipv4_to_int(r.start_ip) + 1 for r in network.spec.public_ip_ranges),
        public_ips_allocated=public_ips_allocated,
    )


# ---------------------------------------------------------------------------------------------
# Offerings
# ---------------------------------------------------------------------------------------------


def offering_ready(enabled: bool) -> Check:
    return Check.passed() if enabled else Check.failed("Disabled", "the offering is disabled: not usable for new objects")
