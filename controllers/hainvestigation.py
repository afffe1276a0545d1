"""HA investigation (CloudStack's KVMInvestigator), pure logic: is a host whose Lease expired dead or only cut off?

The controller cannot read primary storage (in production it runs in a pod), so neighbours do: it asks up to
``NEIGHBOURS`` Up hosts that reach the suspect's shared pools (an annotation on each of their Hosts, which their
agents watch anyway) to read the suspect's storage heartbeat, and they answer in their own ``status.node``. Nothing
is written while every host is Up.

Outcomes:

* ALIVE: some neighbour read a fresh heartbeat → the host is Alert (alive, cut off from the API); nothing restarts.
* DEAD: every heartbeat pool was read stale (older than ``down_after``) by some neighbour, none fresh, and the
  Lease has not been renewed for ``down_after`` either → the host is Down (fenced) and its HA guests restart
  elsewhere. A pool nobody could read is never taken for stale.
* BLIND: nobody can tell (no shared pool, no neighbour, a pool no neighbour reads) → nothing is done; the
  condition says why.
* PENDING: asked, answers not (yet) conclusive.

Timing (why DEAD means the guests are dead): the agent fences itself — destroys its HA guests' domains — once it
has renewed neither its Lease nor its storage heartbeat for ``fence_after`` seconds (its own clock). DEAD needs
both silent for ``down_after`` > ``fence_after`` + one heartbeat interval + one check interval, so by then the
agent, if it runs at all, has fenced. Heartbeat stamps are wall-clock times compared across hosts: hosts keep
their clocks in sync (NTP), as CloudStack's heartbeat file assumes; a skew eats into that margin.

VM activity (CloudStack's KVMHAVMActivityChecker): the fencing is done by the agent, so an agent process dead or hung
while its QEMU processes run would look like a dead host. Neighbours therefore also look at the disk files of the
suspect's HA guests (SharedMountPoint pools): a file modified after the suspect's last heartbeat stamp plus the
agents' ``--fence-after`` and two heartbeat intervals belongs to a guest still running where it should have been
fenced, and the host is Alert (``GuestActivity``), never Down. Limits: a guest that writes nothing is not seen (run
the agent under a supervisor that restarts it well within ``down_after``); RBD disks are not checked yet; the file
times come from the storage's clock. A guest whose live migration is under
way when its source is found Down fails (SourceHostDown, controllers/reconcilers/migration.py), then HA acts.
"""

from __future__ import annotations

import dataclasses
import typing as t

from controllers.api.v1alpha1.common import StrEnum
from controllers.api.v1alpha1.host import HeartbeatPool, PeerHeartbeat
from controllers.conditions import Check

NEIGHBOURS = 3
"""How many neighbours investigate one host: enough that one broken neighbour does not decide, few writes."""

SHARED_POOL_TYPES = ("SharedMountPoint", "RBD")


class Outcome(StrEnum):
    PENDING = "Pending"
    ALIVE = "Alive"
    DEAD = "Dead"
    BLIND = "Blind"


@dataclasses.dataclass(frozen=True)
class Neighbour:
    name: str
    up: bool
    reachable_pools: frozenset[str]


@dataclasses.dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    check: Check


def heartbeat_pools(reachable: t.Iterable[str], pools: t.Mapping[str, t.Any]) -> list[HeartbeatPool]:
    """The shared pools the suspect wrote its heartbeat on: shared types (not Host-scoped) it last reported
    reachable. ``pools``: StoragePool objects by name."""
    found = []
    for name in sorted(set(reachable)):
        pool = pools.get(name)
        if pool is None or pool.spec.type.value not in SHARED_POOL_TYPES or pool.spec.scope.value == "Host":
            continue
        path = pool.spec.rbd.pool if pool.spec.rbd is not None else pool.spec.path
        found.append(HeartbeatPool(name=name, type=pool.spec.type.value, path=path or ""))
    return found


MAX_ACTIVITY_DISKS = 32
"""Disk files per pool a neighbour checks for guest activity (bounds the request annotation)."""


def with_activity_disks(pools: list[HeartbeatPool], disks: t.Iterable[tuple[str, str, str]]) -> list[HeartbeatPool]:
    """The heartbeat pools with the disk files of the suspect's HA guests on them (``disks``: pool name, pool
    type, path), for the VM activity check; files only (SharedMountPoint)."""
    by_pool: dict[str, list[str]] = {}
    for pool_name, pool_type, path in disks:
        if pool_type == "SharedMountPoint":
            by_pool.setdefault(pool_name, []).append(path)
    return [pool.model_copy(update={"disks": sorted(set(by_pool.get(pool.name, [])))[:MAX_ACTIVITY_DISKS]})
            for pool in pools]


def choose_neighbours(suspect: str, pools: list[HeartbeatPool], candidates: t.Iterable[Neighbour],
                      limit: int = NEIGHBOURS) -> dict[str, list[HeartbeatPool]]:
    """Up hosts (never the suspect) reaching at least one heartbeat pool, by name, at most ``limit``; each
    asked about the pools it reaches."""
    chosen: dict[str, list[HeartbeatPool]] = {}
    for candidate in sorted(candidates, key=lambda c: c.name):
        if len(chosen) >= limit:
            break
        if candidate.name == suspect or not candidate.up:
            continue
        mine = [pool for pool in pools if pool.name in candidate.reachable_pools]
        if mine:
            chosen[candidate.name] = mine
    return chosen


def verdict(suspect: str, pools: list[HeartbeatPool], asked: t.Mapping[str, list[HeartbeatPool]],
            answers: t.Mapping[str, t.Mapping[str, PeerHeartbeat] | None], lease_age: float,
            down_after: float) -> Verdict:
    """The outcome of the investigation of ``suspect`` from its neighbours' answers (by neighbour, then pool)."""
    if not pools:
        return Verdict(Outcome.BLIND, Check.failed(
            "CannotInvestigate", f"host {suspect} uses no shared primary storage to check a storage heartbeat on; "
            "it is not fenced and nothing is restarted"))
    names = ", ".join(p.name for p in pools)
    if not asked:
        return Verdict(Outcome.BLIND, Check.failed(
            "CannotInvestigate", f"no Up host reaching pool(s) {names} can read the storage heartbeat of {suspect}; "
            "it is not fenced and nothing is restarted"))
    stale: dict[str, str] = {}
    unreadable: dict[str, str] = {}
    for neighbour in sorted(asked):
        answer = answers.get(neighbour) or {}
        for pool in asked[neighbour]:
            read = answer.get(pool.name)
            if read is None:
                continue
            if read.readable and read.guest_activity:
                return Verdict(Outcome.ALIVE, Check.failed(
                    "GuestActivity",
                    f"host {neighbour} sees a guest of {suspect} still running on pool {pool.name} "
                    f"({read.guest_activity}) although the host should have fenced itself: its agent is not "
                    "fencing (dead or hung?); nothing is restarted"))
            if read.readable and read.fresh:
                return Verdict(Outcome.ALIVE, Check.failed(
                    "StorageHeartbeatFresh",
                    f"the Lease expired but host {neighbour} reads a storage heartbeat of {suspect} on pool "
                    f"{pool.name} written within {down_after:g}s: the host is taken as alive and cut off from the "
                    "API; nothing is restarted unless both heartbeats stay silent that long"))
            if read.readable:
                stale.setdefault(pool.name, neighbour)
            else:
                unreadable.setdefault(pool.name, f"{neighbour}: {read.message or 'unreadable'}")
    if len(stale) == len(pools):
        if lease_age < down_after:
            return Verdict(Outcome.PENDING, Check.failed(
                "Investigating", f"the storage heartbeat of {suspect} is stale; waiting for its Lease to be "
                f"silent for {down_after:g}s"))
        readers = ", ".join(f"{pool} (read by {host})" for pool, host in sorted(stale.items()))
        return Verdict(Outcome.DEAD, Check.failed(
            "Fenced", f"host {suspect} renewed neither its Lease nor its storage heartbeat on {readers} for more than "
            f"{down_after:g}s: it is Down and its agent has fenced its HA guests, which restart elsewhere"))
    # A pool is blind when every neighbour asked about it answered that it cannot read it.
    blind = [pool.name for pool in pools if pool.name not in stale and pool.name in unreadable and all(
        (answers.get(n) or {}).get(pool.name) is not None for n in asked if pool in asked[n])]
    if blind:
        why = "; ".join(unreadable[name] for name in blind)
        return Verdict(Outcome.BLIND, Check.failed(
            "CannotInvestigate", f"no neighbour can read the storage heartbeat of {suspect} on pool(s) "
            f"{', '.join(blind)} ({why}); it is not fenced and nothing is restarted"))
    return Verdict(Outcome.PENDING, Check.failed(
        "Investigating", f"the Lease of {suspect} expired; hosts {', '.join(sorted(asked))} are reading its storage "
        f"heartbeat on pool(s) {names}"))


class DownAction(StrEnum):
    RESTART = "Restart"
    KEEP = "Keep"


def on_down_host(host: str, ha: bool, pool: str | None, local: bool) -> tuple[DownAction, Check]:
    """What becomes of a guest placed on a Down (fenced) host: an HA guest on shared storage is placed again
    elsewhere; one on local storage, or not HA-enabled, stays placed there, stopped, with a reason."""
    if local:
        return DownAction.KEEP, Check.failed(
            "LocalStorage", f"host {host} is Down and a disk of the guest is on its local pool {pool}: the guest "
            f"cannot restart elsewhere; it starts again when {host} is back")
    if not ha:
        return DownAction.KEEP, Check.failed(
            "HostDown", f"host {host} is Down; the guest is not HA-enabled (spec.haEnabled, or the offering's "
            "offerHA), so it is not restarted elsewhere: set spec.state Stopped then Running to start it on another "
            "host")
    return DownAction.RESTART, Check.passed("Restarting", f"host {host} is Down: restarting the HA guest elsewhere")
