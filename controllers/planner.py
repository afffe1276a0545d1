"""The deployment planner and capacity ledger (pure: no kopf, no I/O).

Like CloudStack's DeploymentPlanner + HostAllocators + CapacityManager: filters remove hosts that
cannot take a guest, an allocator picks among the rest, and the ledger reserves the guest's CPU and
memory on the chosen host before anything acts on it. The ledger is rebuilt from the placements
recorded in the VirtualMachine objects when the controller starts, and the controller records a
placement before any agent acts, so a crash never loses or doubles a reservation.
"""

from __future__ import annotations

import collections
import dataclasses
import random
import typing as t

from controllers.api.v1alpha1.zone import AllocationAlgorithm


@dataclasses.dataclass(frozen=True)
class PoolCandidate:
    """A primary storage pool as the planner sees it."""

    name: str
    scope: str  # Host, Cluster or Zone
    scope_name: str  # the host, cluster or zone it belongs to
    tags: frozenset[str]
    usable: bool  # enabled, Up
    hosts: frozenset[str]  # hosts that report it reachable
    capacity_bytes: int  # after overprovisioning
    allocated_bytes: int
    local: bool  # host-local storage (Filesystem)


@dataclasses.dataclass(frozen=True)
class HostCandidate:
    """A host as the planner sees it: placement facts, nothing live."""

    name: str
    zone: str
    pod: str
    cluster: str
    hypervisor: str
    tags: frozenset[str]
    cpu_total: int  # after the cluster's overcommit ratio
    memory_total_mib: int
    unusable: str = ""  # why no guest may go here ("Disconnected", "Disabled", ...), "" when usable


@dataclasses.dataclass(frozen=True)
class AffinityRule:
    """An affinity group the guest belongs to, with the hosts its other members run on."""

    group: str
    kind: str  # HostAffinity, HostAntiAffinity, NonStrictHostAffinity, NonStrictHostAntiAffinity
    member_hosts: frozenset[str]


@dataclasses.dataclass(frozen=True)
class Request:
    """What one guest needs."""

    key: str  # namespace/name of the VirtualMachine
    owner: str  # its namespace (UserDispersing spreads one owner's guests)
    zone: str
    cpu: int
    memory_mib: int
    hypervisor: str
    host_tags: frozenset[str] = frozenset()
    storage_type: str = "shared"  # local or shared
    storage_tags: frozenset[str] = frozenset()
    disk_bytes: int = 0  # the root disk to place with the guest
    affinity: tuple[AffinityRule, ...] = ()
    pod: str | None = None
    cluster: str | None = None
    host: str | None = None  # admin pins
    avoid: frozenset[str] = frozenset()  # hosts that must not be chosen (a migration's source)


@dataclasses.dataclass(frozen=True)
class Decision:
    host: str | None
    pool: str | None
    reason: str  # Scheduled, or why not: InsufficientCapacity, NoMatchingHost, InsufficientStorage, ...
    message: str

    @property
    def ok(self) -> bool:
        return self.host is not None


@dataclasses.dataclass
class Reservation:
    host: str
    cpu: int
    memory_mib: int
    owner: str


class Ledger:
    """Reserved CPU and memory per host, by guest; the single source of truth for free capacity."""

    def __init__(self) -> None:
        self._by_guest: dict[str, Reservation] = {}
        self._cpu: collections.Counter[str] = collections.Counter()
        self._memory: collections.Counter[str] = collections.Counter()
        self._guests_of_owner: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self._pool_bytes: collections.Counter[str] = collections.Counter()
        self._pool_by_volume: dict[str, tuple[str, int]] = {}

    def reserve(self, key: str, host: str, cpu: int, memory_mib: int, owner: str) -> None:
        self.release(key)
        self._by_guest[key] = Reservation(host, cpu, memory_mib, owner)
        self._cpu[host] += cpu
        self._memory[host] += memory_mib
        self._guests_of_owner[owner][host] += 1

    def release(self, key: str) -> Reservation | None:
        reservation = self._by_guest.pop(key, None)
        if reservation is not None:
            self._cpu[reservation.host] -= reservation.cpu
            self._memory[reservation.host] -= reservation.memory_mib
            self._guests_of_owner[reservation.owner][reservation.host] -= 1
        return reservation

    def reserve_disk(self, volume_key: str, pool: str, size_bytes: int) -> None:
        self.release_disk(volume_key)
        self._pool_by_volume[volume_key] = (pool, size_bytes)
        self._pool_bytes[pool] += size_bytes

    def release_disk(self, volume_key: str) -> None:
        entry = self._pool_by_volume.pop(volume_key, None)
        if entry is not None:
            self._pool_bytes[entry[0]] -= entry[1]

    def reservation(self, key: str) -> Reservation | None:
        return self._by_guest.get(key)

    def used(self, host: str) -> tuple[int, int]:
        return self._cpu[host], self._memory[host]

    def pool_allocated(self, pool: str) -> int:
        return self._pool_bytes[pool]

    def owner_count(self, host: str, owner: str) -> int:
        return self._guests_of_owner.get(owner, {}).get(host, 0)

    def guests_of(self, owner: str) -> t.Mapping[str, int]:
        """Number of the owner's guests per host."""
        return self._guests_of_owner.get(owner, {})

    def memory_used(self) -> t.Mapping[str, int]:
        return self._memory


# ---------------------------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------------------------


def _pinned(request: Request, host: HostCandidate) -> str:
    if request.host and host.name != request.host:
        return f"not the pinned host {request.host}"
    if request.cluster and host.cluster != request.cluster:
        return f"not in the pinned cluster {request.cluster}"
    if request.pod and host.pod != request.pod:
        return f"not in the pinned pod {request.pod}"
    return ""


def _tags(request: Request, host: HostCandidate) -> str:
    missing = request.host_tags - host.tags
    return f"lacks host tags {sorted(missing)}" if missing else ""


def _affinity(request: Request, host: HostCandidate) -> str:
    for rule in request.affinity:
        if rule.kind == "HostAntiAffinity" and host.name in rule.member_hosts:
            return f"runs a member of anti-affinity group {rule.group}"
        if rule.kind == "HostAffinity" and rule.member_hosts and host.name not in rule.member_hosts:
            return f"does not run the members of affinity group {rule.group}"
    return ""


class Inventory:
    """Hosts and pools indexed for planning; build it once and reuse it while they do not change."""

    def __init__(self, hosts: t.Iterable[HostCandidate], pools: t.Iterable[PoolCandidate]):
        self.hosts_by_zone: dict[str, list[HostCandidate]] = collections.defaultdict(list)
        for host in sorted(hosts, key=lambda h: h.name):
            self.hosts_by_zone[host.zone].append(host)
        self.pools_by_host: dict[str, list[PoolCandidate]] = collections.defaultdict(list)
        for pool in pools:
            for host in pool.hosts:
                self.pools_by_host[host].append(pool)


def _storage_pools(request: Request, host: HostCandidate, inventory: Inventory,
                   ledger: Ledger) -> tuple[PoolCandidate | None, str]:
    """The roomiest pool the root disk could go to from this host, or why there is none."""
    local = request.storage_type == "local"
    reachable = [p for p in inventory.pools_by_host.get(host.name, ()) if p.usable and p.local == local
                 and request.storage_tags <= p.tags]
    if not reachable:
        kind = "local" if local else "shared"
        tags = f" with storage tags {sorted(request.storage_tags)}" if request.storage_tags else ""
        return None, f"reaches no usable {kind} pool{tags}"
    best, best_free = None, -1
    for pool in reachable:
        free = pool.capacity_bytes - max(pool.allocated_bytes, ledger.pool_allocated(pool.name))
        if free >= request.disk_bytes and (free > best_free or free == best_free and pool.name < best.name):
            best, best_free = pool, free
    if best is None:
        return None, f"its pools lack {request.disk_bytes // 2**30} GiB free"
    return best, ""


def _random_order(hosts: list[HostCandidate], rng: random.Random) -> t.Iterator[HostCandidate]:
    """Hosts in random order: a few uniform draws first (cheap when most hosts fit; the first fitting
    draw is uniform among the fitting hosts), then every host shuffled (the caller skips repeats)."""
    if not hosts:
        return
    for _ in range(8):
        yield hosts[rng.randrange(len(hosts))]
    rest = list(hosts)
    rng.shuffle(rest)
    yield from rest


def plan(request: Request, inventory: Inventory, ledger: Ledger,
         algorithm: AllocationAlgorithm = AllocationAlgorithm.FIRST_FIT,
         rng: random.Random | None = None) -> Decision:
    """Choose a host and a root-disk pool for ``request``, or say precisely why none fits.

    Each allocator is an order of the hosts, and the first host that fits wins: name order for
    FirstFit, random for Random, fewest guests of the owner for UserDispersing. Non-strict affinity
    preferences compare every fitting host. Only a refusal needs every host examined, to say why each
    was dropped.
    """
    eliminated: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    preferred_anti: set[str] = set()
    preferred_with: set[str] = set()
    for rule in request.affinity:
        if rule.kind == "NonStrictHostAntiAffinity":
            preferred_anti |= rule.member_hosts
        elif rule.kind == "NonStrictHostAffinity":
            preferred_with |= rule.member_hosts
    compare_all = bool(preferred_anti or preferred_with)

    def drop(host: HostCandidate, category: str, why: str) -> None:
        eliminated[category] += 1
        examples.setdefault(category, f"{host.name} {why}")

    in_zone = inventory.hosts_by_zone.get(request.zone, [])
    order: t.Iterable[HostCandidate] = in_zone
    if algorithm == AllocationAlgorithm.RANDOM:
        order = _random_order(in_zone, rng or random.Random())
    elif algorithm == AllocationAlgorithm.USER_DISPERSING:
        # Fewest guests of this owner first, then the emptiest host, as CloudStack's UserDispersing does;
        # the first host that fits in this order is the one it would choose.
        owned, memory = ledger.guests_of(request.owner), ledger.memory_used()
        order = sorted(in_zone, key=lambda h: (owned.get(h.name, 0), memory.get(h.name, 0) / (h.memory_total_mib or 1),
                                               h.name))
    fits: list[tuple[HostCandidate, PoolCandidate]] = []
    seen: set[str] = set()
    for host in order:
        if host.name in seen:
            continue
        seen.add(host.name)
        if host.name in request.avoid:
            drop(host, "source", "is the guest's current host")
        elif why := _pinned(request, host):
            drop(host, "pinned", why)
        elif host.unusable:
            drop(host, "unusable", f"is {host.unusable}")
        elif host.hypervisor != request.hypervisor:
            drop(host, "hypervisor", f"runs {host.hypervisor}, not {request.hypervisor}")
        elif why := _tags(request, host):
            drop(host, "tags", why)
        elif why := _affinity(request, host):
            drop(host, "affinity", why)
        else:
            cpu_used, memory_used = ledger.used(host.name)
            if host.cpu_total - cpu_used < request.cpu:
                drop(host, "cpu", f"has {max(host.cpu_total - cpu_used, 0)} of {request.cpu} vCPUs free")
                continue
            if host.memory_total_mib - memory_used < request.memory_mib:
                drop(host, "memory", f"has {max(host.memory_total_mib - memory_used, 0)} of "
                                     f"{request.memory_mib} MiB free")
                continue
            pool, why = _storage_pools(request, host, inventory, ledger)
            if pool is None:
                drop(host, "storage-capacity" if "free" in why else "storage", why)
                continue
            fits.append((host, pool))
            if not compare_all:
                break

    if not fits:
        return _refusal(request, len(in_zone), eliminated, examples)
    if preferred_anti or preferred_with:
        def rank(fit: tuple[HostCandidate, PoolCandidate]) -> tuple[bool, bool]:
            return fit[0].name in preferred_anti, bool(preferred_with) and fit[0].name not in preferred_with
        best = min(rank(fit) for fit in fits)
        fits = [fit for fit in fits if rank(fit) == best]
    host, pool = fits[0]
    return Decision(host.name, pool.name, "Scheduled",
                    f"placed on host {host.name} (cluster {host.cluster}) with the root disk on pool {pool.name}")


CATEGORY_TEXT = {
    "source": "the guest's current host",
    "pinned": "outside the admin's pin",
    "unusable": "not usable",
    "hypervisor": "of another hypervisor",
    "tags": "without the offering's host tags",
    "affinity": "excluded by affinity groups",
    "cpu": "short of CPU",
    "memory": "short of memory",
    "storage": "without a matching storage pool",
    "storage-capacity": "short of primary storage",
}


def _refusal(request: Request, considered: int, eliminated: collections.Counter[str],
             examples: dict[str, str]) -> Decision:
    if considered == 0:
        return Decision(None, None, "NoHostInZone", f"zone {request.zone} has no hosts")
    if set(eliminated) - {"source"} <= {"cpu", "memory", "storage-capacity"} and set(eliminated) != {"source"}:
        reason = "InsufficientCapacity"
    elif request.host and eliminated.get("pinned", 0) + eliminated.get("source", 0) == considered:
        reason = "PinnedHostNotFound"
    else:
        reason = "NoMatchingHost"
    parts = [f"{count} {CATEGORY_TEXT[category]} (e.g. {examples[category]})"
             for category, count in sorted(eliminated.items(), key=lambda item: -item[1])]
    return Decision(None, None, reason,
                    f"none of the {considered} hosts in zone {request.zone} fits {request.cpu} vCPU / "
                    f"{request.memory_mib} MiB: " + "; ".join(parts))
