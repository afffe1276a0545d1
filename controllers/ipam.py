"""Address and identifier management: guest IPs of a network, VLAN IDs / VNIs of a physical network, public
IPs of a zone's public ranges, and guest MAC addresses. Pure: no kopf, no I/O.

Everything is a :class:`Pool` of integers drawn from inclusive ranges, each held by one owner (a NIC, a
network, a PublicIPAddress). The controller keeps the pools in memory, rebuilt on start from what the
objects record (:meth:`Pool.record`), and records an allocation in the owner's status before anything acts
on it, so neither concurrent reconciles (one event loop: allocation never awaits) nor a restart can hand
one value to two owners (DESIGN.md §3, rule 6 applies to addresses as to capacity).
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import heapq
import ipaddress
import typing as t
from collections.abc import Iterable


class AllocationError(Exception):
    """An allocation cannot be made; ``reason`` is a CamelCase condition reason, the message says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Pool:
    """Integers from inclusive ``ranges`` minus ``reserved``, each held by at most one owner.

    ``allocate`` is idempotent per owner and gives the lowest free value. Finding it never rescans the used
    values: a cursor (``_next``) marks how far allocation has walked the ranges, and every value below it
    that became free again (a release) waits in a min-heap (``_freed``), so filling a pool and replacing its
    owners cost O(log n) per allocation (a /16 fills in a fraction of a second, not minutes)."""

    def __init__(self, ranges: Iterable[tuple[int, int]], reserved: Iterable[int] = (), *,
                 describe: t.Callable[[int], str] = str) -> None:
        self.ranges = sorted((start, end) for start, end in ranges if start <= end)
        self.reserved = frozenset(reserved)
        self.describe = describe
        self._owner_of: dict[int, str] = {}
        self._value_of: dict[str, int] = {}
        self._starts = [start for start, _ in self.ranges]
        # Every free, unreserved value below ``_next`` is in ``_freed`` (entries taken since, by a record or
        # a wanted value, are skipped when popped).
        self._next = self.ranges[0][0] if self.ranges else 0
        self._freed: list[int] = []
        self.size = sum(end - start + 1 for start, end in self.ranges) - \
            sum(1 for value in self.reserved if self.contains(value))

    def contains(self, value: int) -> bool:
        index = bisect.bisect_right(self._starts, value) - 1
        return index >= 0 and value <= self.ranges[index][1]

    @property
    def used(self) -> int:
        return len(self._value_of)

    def get(self, owner: str) -> int | None:
        return self._value_of.get(owner)

    def owner(self, value: int) -> str | None:
        return self._owner_of.get(value)

    def owners(self) -> dict[str, int]:
        return dict(self._value_of)

    def record(self, owner: str, value: int) -> str | None:
        """Rebuild: ``owner`` holds ``value`` (as its object says). Returns the other owner already holding
        it (the record is refused), else None. Values outside the ranges are kept: they were valid when
        given and stay the owner's until it lets them go."""
        holder = self._owner_of.get(value)
        if holder is not None and holder != owner:
            return holder
        self.release(owner)
        self._owner_of[value] = owner
        self._value_of[owner] = value
        return None

    def allocate(self, owner: str, wanted: int | None = None) -> int:
        """The owner's value: ``wanted`` if given (refused if taken, reserved or outside the ranges), else
        the one it holds, else the lowest free one. Raises :class:`AllocationError`."""
        current = self._value_of.get(owner)
        if wanted is None:
            if current is not None:
                return current
            value = self._first_free()
            if value is None:
                raise AllocationError("Exhausted", f"all {self.size} values are in use")
        else:
            if wanted == current:
                return current
            if not self.contains(wanted):
                raise AllocationError("OutOfRange", f"{self.describe(wanted)} is outside the allocatable range")
            if wanted in self.reserved:
                raise AllocationError("Reserved", f"{self.describe(wanted)} is reserved")
            holder = self._owner_of.get(wanted)
            if holder is not None:
                raise AllocationError("InUse", f"{self.describe(wanted)} is in use by {holder}")
            value = wanted
        self.release(owner)
        self._owner_of[value] = owner
        self._value_of[owner] = value
        return value

    def release(self, owner: str) -> int | None:
        value = self._value_of.pop(owner, None)
        if value is not None:
            self._owner_of.pop(value, None)
            if value < self._next and value not in self.reserved and self.contains(value):
                heapq.heappush(self._freed, value)
        return value

    def _first_free(self) -> int | None:
        if self.used >= self.size:
            return None
        while self._freed:
            value = heapq.heappop(self._freed)
            if value not in self._owner_of:
                return value
        # Nothing freed below the cursor: walk on from it (past values recorded or wanted meanwhile).
        for start, end in self.ranges:
            value = max(start, self._next)
            while value <= end:
                if value not in self._owner_of and value not in self.reserved:
                    self._next = value + 1
                    return value
                value += 1
        self._next = self.ranges[-1][1] + 1 if self.ranges else 0
        return None


def ip_str(value: int) -> str:
    return str(ipaddress.IPv4Address(value))


def ip_int(address: str) -> int:
    return int(ipaddress.IPv4Address(address))


@dataclasses.dataclass(frozen=True)
class Subnet:
    """The addressing of a guest network: what IPAM may hand out and what it must not."""

    cidr: str
    gateway: str | None = None
    start_ip: str | None = None
    end_ip: str | None = None

    def pool(self) -> AddressPool:
        network = ipaddress.IPv4Network(self.cidr)
        first, last = int(network.network_address) + 1, int(network.broadcast_address) - 1
        if network.prefixlen >= 31:
            first, last = int(network.network_address), int(network.broadcast_address)
        start = max(first, ip_int(self.start_ip)) if self.start_ip else first
        end = min(last, ip_int(self.end_ip)) if self.end_ip else last
        reserved = {ip_int(self.gateway)} if self.gateway else set()
        return AddressPool(self, [(start, end)], reserved)


class AddressPool(Pool):
    """A :class:`Pool` of IPv4 addresses, spoken in dotted quads."""

    def __init__(self, subnet: Subnet, ranges: Iterable[tuple[int, int]], reserved: Iterable[int]) -> None:
        super().__init__(ranges, reserved, describe=ip_str)
        self.subnet = subnet
        self.network = ipaddress.IPv4Network(subnet.cidr)

    def address(self, owner: str) -> str | None:
        value = self.get(owner)
        return ip_str(value) if value is not None else None

    def allocate_address(self, owner: str, wanted: str | None = None) -> str:
        if wanted is not None and ipaddress.IPv4Address(wanted) not in self.network:
            raise AllocationError("OutOfRange", f"{wanted} is not in {self.subnet.cidr}")
        return ip_str(self.allocate(owner, ip_int(wanted) if wanted else None))

    def record_address(self, owner: str, address: str) -> str | None:
        return self.record(owner, ip_int(address))


def public_pool(ranges: Iterable[tuple[str, str, str]]) -> Pool:
    """The public addresses of a physical network: ``(startIp, endIp, gateway)`` ranges, gateways reserved."""
    ranges = list(ranges)
    return Pool([(ip_int(start), ip_int(end)) for start, end, _ in ranges], [ip_int(gw) for _, _, gw in ranges],
                describe=ip_str)


def mac_address(seed: str, attempt: int = 0) -> str:
    """A locally administered unicast MAC derived from ``seed`` (a NIC's identity), stable across restarts
    so a rebuilt controller makes the same one; ``attempt`` > 0 draws another on a collision."""
    digest = hashlib.sha256(f"{seed}#{attempt}".encode()).digest()
    return "02:" + ":".join(f"{byte:02x}" for byte in digest[:5])


def first_host(cidr: str) -> str:
    """The conventional gateway of a CIDR: its first host address."""
    return ip_str(int(ipaddress.IPv4Network(cidr).network_address) + 1)
