"""Pure logic of the agent's reports: which pools, stores and bridges a host checks, and when a new
``status.node`` is worth an API write. No I/O here: everything is unit-tested directly.

Objects are the raw JSON dicts the watches deliver (camelCase keys).
"""

from __future__ import annotations

import dataclasses
import datetime
import typing as t
from collections.abc import Iterable, Mapping

from controllers.api.v1alpha1.host import SIMULATOR_FAULTS_ANNOTATION
from controllers.api.v1alpha1.storagepool import PoolScope, PoolType

USED_BYTES_TOLERANCE = 0.01
"""A change of usedBytes smaller than this fraction of capacity is not worth a write on its own;
the periodic refresh carries it."""

MAP_FIELDS = ("storagePools", "imageStores", "bridges")


def _spec(obj: Mapping[str, t.Any]) -> Mapping[str, t.Any]:
    return obj.get("spec") or {}


def _name(obj: Mapping[str, t.Any]) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a host sits, as far as its agent knows: spec.cluster, and status.zone once the controller
    has filled it in."""

    host: str
    cluster: str | None
    zone: str | None

    @classmethod
    def of(cls, host: Mapping[str, t.Any]) -> Placement:
        return cls(host=_name(host), cluster=_spec(host).get("cluster"),
                   zone=(host.get("status") or {}).get("zone"))


@dataclasses.dataclass(frozen=True)
class StorageTarget:
    """One directory to check, an RBD pool (``rbd``: its spec.rbd; ``path``: the Ceph pool), or a pool the agent
    cannot check (``unsupported`` says why)."""

    name: str
    path: str | None
    create: bool = False
    writable: bool = True
    unsupported: str | None = None
    rbd: Mapping[str, t.Any] | None = None


def pools_for_host(placement: Placement, pools: Iterable[Mapping[str, t.Any]]) -> list[StorageTarget]:
    """The primary pools the host may use: its own Host-scoped pools, and once its zone is known, the
    pools of its cluster and of its zone. Filesystem pools are the host's local storage, so their
    directory is created; a SharedMountPoint path never is (a missing mount must not silently become
    a local directory)."""
    targets = []
    for pool in pools:
        spec = _spec(pool)
        scope = spec.get("scope")
        if scope == PoolScope.HOST:
            mine = spec.get("host") == placement.host
        elif placement.zone is None:
            mine = False
        elif scope == PoolScope.CLUSTER:
            mine = placement.cluster is not None and spec.get("cluster") == placement.cluster
        elif scope == PoolScope.ZONE:
            mine = spec.get("zone") == placement.zone
        else:
            mine = False
        if not mine:
            continue
        kind = spec.get("type")
        if kind == PoolType.RBD:
            rbd = spec.get("rbd") or {}
            targets.append(StorageTarget(_name(pool), rbd.get("pool"), rbd=rbd,
                                         unsupported=None if rbd.get("pool") else "RBD pool without spec.rbd"))
        elif kind in (PoolType.FILESYSTEM, PoolType.SHARED_MOUNT_POINT) and spec.get("path"):
            targets.append(StorageTarget(_name(pool), spec["path"], create=kind == PoolType.FILESYSTEM))
        else:
            targets.append(StorageTarget(_name(pool), None, unsupported=f"pool type {kind!r} without a path"))
    return sorted(targets, key=lambda target: target.name)


def stores_for_host(placement: Placement, stores: Iterable[Mapping[str, t.Any]]) -> list[StorageTarget]:
    """The image stores of the host's zone (none until the zone is known). Never created; a read-only
    store only needs to be readable."""
    if placement.zone is None:
        return []
    return sorted(
        (StorageTarget(_name(store), _spec(store).get("path"), writable=not _spec(store).get("readOnly", False))
         for store in stores if _spec(store).get("zone") == placement.zone),
        key=lambda target: target.name,
    )


def bridge_labels_for_host(placement: Placement, networks: Iterable[Mapping[str, t.Any]]) -> list[str]:
    """The traffic labels (bridge names) of the physical networks of the host's zone."""
    if placement.zone is None:
        return []
    return sorted({str(traffic["label"]) for network in networks if _spec(network).get("zone") == placement.zone
                   for traffic in _spec(network).get("trafficTypes") or [] if traffic.get("label")})


def host_inputs(host: Mapping[str, t.Any] | None) -> tuple[t.Any, ...]:
    """What of a Host object changes the agent's work for it. Its own status.node writes and the
    controller's conditions do not, so they wake nobody."""
    if host is None:
        return (None,)
    metadata = host.get("metadata") or {}
    return (metadata.get("uid"), _spec(host).get("cluster"), (host.get("status") or {}).get("zone"),
            (metadata.get("annotations") or {}).get(SIMULATOR_FAULTS_ANNOTATION))


# --------------------------------------------------------------------------------------------
# Patch minimisation


def prune(value: t.Any) -> t.Any:
    """``value`` without None entries (what the apiserver stores of a merge patch)."""
    if isinstance(value, Mapping):
        return {key: prune(item) for key, item in value.items() if item is not None}
    return value


def _without_volatile(node: Mapping[str, t.Any]) -> dict[str, t.Any]:
    """The report minus reportedAt and the usedBytes figures (compared with a tolerance instead)."""
    result = {key: value for key, value in prune(node).items() if key != "reportedAt"}
    for field in ("storagePools", "imageStores"):
        if field in result:
            result[field] = {name: {k: v for k, v in report.items() if k != "usedBytes"}
                             for name, report in result[field].items()}
    return result


def _used_bytes_moved(previous: Mapping[str, t.Any], current: Mapping[str, t.Any]) -> bool:
    for field in ("storagePools", "imageStores"):
        for name, report in (current.get(field) or {}).items():
            old = (previous.get(field) or {}).get(name) or {}
            before, now = old.get("usedBytes"), report.get("usedBytes")
            if (before is None) != (now is None):
                return True
            if before is not None and now is not None:
                capacity = report.get("capacityBytes") or 0
                if abs(now - before) > max(capacity * USED_BYTES_TOLERANCE, 0):
                    return True
    return False


def significant_change(previous: Mapping[str, t.Any] | None, current: Mapping[str, t.Any]) -> bool:
    """Whether ``current`` says something ``previous`` (what the apiserver has) does not: any fact,
    health or reachability, or a usedBytes move beyond the tolerance. reportedAt alone is not."""
    if previous is None:
        return True
    return _without_volatile(previous) != _without_volatile(current) or _used_bytes_moved(prune(previous),
                                                                                         prune(current))


def parse_time(value: t.Any) -> datetime.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.timezone.utc)


def needs_report(previous: Mapping[str, t.Any] | None, current: Mapping[str, t.Any], *,
                 now: datetime.datetime, refresh_seconds: float) -> bool:
    """Patch when something changed, or when the last report (previous.reportedAt) is older than
    ``refresh_seconds`` so readers can tell a live reporter from a stale one."""
    if significant_change(previous, current):
        return True
    reported_at = parse_time((previous or {}).get("reportedAt"))
    return reported_at is None or (now - reported_at).total_seconds() >= refresh_seconds


def node_patch(previous: Mapping[str, t.Any] | None, current: Mapping[str, t.Any]) -> dict[str, t.Any]:
    """A JSON merge patch turning ``previous`` into ``current``: ``current`` in full, with null for
    every key ``previous`` has and ``current`` lacks (a pool no longer checked, a capacity that is
    unknown now), at any depth."""

    def diff(old: t.Any, new: t.Any) -> t.Any:
        if not isinstance(new, Mapping):
            return new
        result: dict[str, t.Any] = {}
        old_map = old if isinstance(old, Mapping) else {}
        for key, value in new.items():
            result[key] = diff(old_map.get(key), value) if value is not None else None
        for key in old_map:
            if key not in new:
                result[key] = None
        return result

    patch = diff(prune(previous or {}), current)
    # A null that removes nothing is noise; keep nulls only where previous had a value.
    return _drop_idle_nulls(patch, prune(previous or {}))


def _drop_idle_nulls(patch: Mapping[str, t.Any], previous: Mapping[str, t.Any]) -> dict[str, t.Any]:
    result: dict[str, t.Any] = {}
    for key, value in patch.items():
        if value is None:
            if key in previous:
                result[key] = None
        elif isinstance(value, Mapping):
            old = previous.get(key)
            result[key] = _drop_idle_nulls(value, old if isinstance(old, Mapping) else {})
        else:
            result[key] = value
    return result
