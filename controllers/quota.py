"""The quota ledger (pure: no kopf, no I/O), CloudStack's ResourceLimitService in the planner's mould.

Each namespace's charged objects (guests, volumes, snapshots, networks, public IPs) hold an entry with
what they charge against the namespace's ``Quota``. An entry is *admitted* (it may start, allocate,
be placed) or *waiting* (it exists but does not fit). Admission is sticky: an admitted entry stays
admitted until its object goes, even when an admin lowers the limits below the use.

Two ways in, both in the controller process and on its one event loop, so neither races the other:

- :meth:`QuotaLedger.admit` — the validating webhook, for a create or a resize: the request is
  checked against everything the namespace holds *and every admission still in flight* (reserved
  but not yet seen in the controller's store), and reserved when it fits. That is what makes twenty
  concurrent creates against a limit of ten admit exactly ten. A reservation the store does not
  confirm within ``PENDING_SECONDS`` (the create failed after admission) lapses.
- :meth:`QuotaLedger.sync` — the objects the store holds: new ones are admitted in arrival order
  (creationTimestamp, then uid) while they fit, objects that already hold resources (a placed guest)
  first and unconditionally. On start the ledger is rebuilt this way from the objects alone, so a
  crash loses nothing: what was placed stays placed, the rest queues in creation order.
"""

from __future__ import annotations

import dataclasses
import typing as t

RESOURCES = ("virtualMachines", "cpus", "memoryMiB", "volumes", "primaryStorageGiB", "snapshots", "networks",
             "publicIPs")
"""Limited resources, by the wire names of ``Quota.spec.limits``."""

PENDING_SECONDS = 30.0
"""How long an admitted create may take to reach the store before its reservation lapses (the
webhook's own timeout is at most 30 s, then the write either happened or did not)."""

Amounts = dict[str, int]
"""Resource (wire name) -> amount; missing resources are 0 (in limits: unlimited)."""


def add(a: t.Mapping[str, int], b: t.Mapping[str, int], sign: int = 1) -> Amounts:
    out = dict(a)
    for resource, amount in b.items():
        out[resource] = out.get(resource, 0) + sign * amount
    return {r: v for r, v in out.items() if v}


def excess(used: t.Mapping[str, int], charge: t.Mapping[str, int], limits: t.Mapping[str, int | None],
           previous: t.Mapping[str, int] | None = None) -> list[str]:
    """The limits ``charge`` would break on top of ``used`` (an object being resized contributes
    ``previous`` to ``used`` already), each as ``"cpus 10 + 2 > limit 11"``; only growth is checked."""
    previous = previous or {}
    problems = []
    for resource in RESOURCES:
        limit = limits.get(resource)
        growth = charge.get(resource, 0) - previous.get(resource, 0)
        if limit is None or growth <= 0:
            continue
        current = used.get(resource, 0)
        if current + growth > limit:
            problems.append(f"{resource} {current} + {growth} > limit {limit}")
    return problems


def grows(old: t.Mapping[str, int], new: t.Mapping[str, int]) -> bool:
    """Whether ``new`` asks for more of anything than ``old``."""
    return any(new.get(r, 0) > old.get(r, 0) for r in RESOURCES)


def maximum(a: t.Mapping[str, int], b: t.Mapping[str, int]) -> Amounts:
    return {r: v for r in RESOURCES if (v := max(a.get(r, 0), b.get(r, 0)))}


@dataclasses.dataclass
class Entry:
    order: tuple[str, str]  # (creationTimestamp, uid): arrival order
    admitted: bool
    observed: Amounts | None = None  # the charge of the version in the store; None until it shows up
    reserved: Amounts | None = None  # what an admission reserved, until the store shows it
    reserved_until: float = 0.0

    @property
    def charge(self) -> Amounts:
        if self.reserved is None:
            return dict(self.observed or {})
        return maximum(self.observed or {}, self.reserved)


@dataclasses.dataclass(frozen=True)
class Observed:
    """One charged object as the store holds it."""

    key: str  # "<Kind>/<name>"
    charge: Amounts
    order: tuple[str, str]
    holds: bool = False  # already holds resources (placed): admitted whatever the limits say


@dataclasses.dataclass(frozen=True)
class Refusal:
    reason: str
    message: str


class QuotaLedger:
    """Quota entries of every namespace; see the module docstring."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {}
        self._limits: dict[str, dict[str, int | None]] = {}

    # -- reads --------------------------------------------------------------------------------

    def limits(self, namespace: str) -> dict[str, int | None]:
        return dict(self._limits.get(namespace, {}))

    def entries(self, namespace: str) -> dict[str, Entry]:
        return self._entries.get(namespace, {})

    def used(self, namespace: str, admitted_only: bool = False) -> Amounts:
        total: Amounts = {}
        for entry in self.entries(namespace).values():
            if entry.admitted or not admitted_only:
                total = add(total, entry.charge)
        return total

    def admitted(self, namespace: str, key: str) -> bool:
        """Whether the object may go ahead (True for objects the ledger does not know: no quota)."""
        entry = self.entries(namespace).get(key)
        return entry is None or entry.admitted

    def waiting(self, namespace: str) -> list[str]:
        return [key for key, entry in sorted(self.entries(namespace).items(), key=lambda kv: kv[1].order)
                if not entry.admitted]

    def why_waiting(self, namespace: str, key: str) -> str:
        entry = self.entries(namespace).get(key)
        if entry is None or entry.admitted:
            return ""
        problems = excess(self.used(namespace, admitted_only=True), entry.charge, self.limits(namespace))
        return "; ".join(problems) or "waiting for older objects of the namespace"

    # -- the webhook --------------------------------------------------------------------------

    def admit(self, namespace: str, key: str, charge: Amounts, order: tuple[str, str], now: float,
              limits: t.Mapping[str, int | None] | None) -> Refusal | None:
        """A create or an update of ``key`` charging ``charge``: refuse it with the numbers, or reserve it."""
        self._expire(namespace, now)
        entries = self._entries.setdefault(namespace, {})
        current = entries.get(key)
        if limits is not None:
            self._limits[namespace] = dict(limits)
        limits = self._limits.get(namespace, {})
        previous = current.charge if current is not None else None
        problems = excess(self.used(namespace), charge, limits, previous)
        if problems:
            return Refusal("QuotaExceeded", f"namespace {namespace}: " + "; ".join(problems))
        if current is None:
            entries[key] = Entry(order, admitted=True, reserved=dict(charge), reserved_until=now + PENDING_SECONDS)
        elif grows(current.charge, charge):
            # A resize: hold the larger charge until the store shows the new version.
            current.reserved = maximum(current.reserved or {}, charge)
            current.reserved_until = now + PENDING_SECONDS
        return None

    # -- the store ----------------------------------------------------------------------------

    def sync(self, namespace: str, objects: t.Iterable[Observed], limits: t.Mapping[str, int | None] | None,
             now: float) -> list[str]:
        """Bring the namespace's entries in line with the store; return the keys admitted by this call."""
        self._limits[namespace] = dict(limits or {})
        self._expire(namespace, now)
        entries = self._entries.setdefault(namespace, {})
        seen = {observed.key: observed for observed in objects}
        for key in [k for k, e in entries.items() if k not in seen and e.reserved is None]:
            del entries[key]  # the object went
        newly: list[str] = []
        fresh = []
        for key, observed in seen.items():
            entry = entries.get(key)
            if entry is None:
                fresh.append(observed)
                continue
            entry.observed, entry.order = dict(observed.charge), observed.order
            if entry.reserved is not None and not grows(entry.observed, entry.reserved):
                entry.reserved = None  # the reserved version has arrived
            if observed.holds and not entry.admitted:
                entry.admitted = True
                newly.append(key)
        # Objects holding resources first (they are placed whatever the limits), then arrival order.
        for observed in sorted(fresh, key=lambda o: (not o.holds, o.order)):
            entries[observed.key] = Entry(observed.order, admitted=observed.holds, observed=dict(observed.charge))
            if observed.holds:
                newly.append(observed.key)
        newly.extend(self._admit_waiting(namespace))
        if not entries:
            self._entries.pop(namespace, None)
        return newly

    def _admit_waiting(self, namespace: str) -> list[str]:
        """Admit waiting entries in arrival order while they fit; the first that does not fit stops the
        queue (a small request does not overtake a big one forever)."""
        entries = self.entries(namespace)
        limits = self._limits.get(namespace, {})
        admitted = []
        for key in self.waiting(namespace):
            entry = entries[key]
            if excess(self.used(namespace, admitted_only=True), entry.charge, limits):
                break
            entry.admitted = True
            admitted.append(key)
        return admitted

    def _expire(self, namespace: str, now: float) -> None:
        """Reservations the store never confirmed lapse; an entry with nothing else goes."""
        entries = self._entries.get(namespace, {})
        for key, entry in list(entries.items()):
            if entry.reserved is not None and entry.reserved_until <= now:
                entry.reserved = None
                if entry.observed is None:
                    del entries[key]

    def forget(self, namespace: str) -> None:
        self._entries.pop(namespace, None)
        self._limits.pop(namespace, None)
