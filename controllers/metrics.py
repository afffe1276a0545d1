"""Prometheus metrics of cumulo-controller.

One :class:`prometheus_client.CollectorRegistry` (``REGISTRY``) holds everything the controller
exports; ``serve(port)`` exposes it over HTTP (``--metrics-port``). Two sorts of metric live here:

- event metrics (reconcile durations and errors, placements, host-monitor transitions), counted
  where they happen by the few hooks below;
- state metrics (objects per kind and phase, capacity, hosts by state), computed from the
  runtime's Store at scrape time by :class:`StoreCollector`, so no reconciler has to keep a gauge
  in step with the world.

Adding metrics from another module (quotas, usage metering, webhooks)::

    from controllers import metrics

    QUOTA_DENIALS = metrics.counter("quota_denials_total", "Requests refused by a Quota.", ["namespace"])
    QUOTA_DENIALS.labels(namespace="tenant-a").inc()

    metrics.register_collector(MyCollector())   # a custom collector computed at scrape time

``counter``/``gauge``/``histogram`` prefix the name with ``cumulo_`` and return the existing metric
when the same name is declared twice (modules imported again by tests, several Runtimes in one
process), so declaring at import time is always safe. Every name must be unique across the
registry; keep label sets small (no object names on event metrics except hosts).
"""

from __future__ import annotations

import threading
import time
import typing as t

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.registry import Collector

PREFIX = "cumulo_"

# ``*_created`` series double every counter and histogram and no dashboard reads them.
disable_created_metrics()

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

_lock = threading.Lock()
_metrics: dict[str, t.Any] = {}

# Reconciles take from a millisecond (nothing to do) to seconds (API round trips, slow writes).
RECONCILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Placement: from first seen to Scheduled; includes waiting for capacity, templates, networks.
PLACEMENT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def _declare(cls: type, name: str, documentation: str, labels: t.Sequence[str], **kwargs: t.Any) -> t.Any:
    full = name if name.startswith(PREFIX) else PREFIX + name
    with _lock:
        existing = _metrics.get(full)
        if existing is not None:
            if not isinstance(existing, cls) or tuple(existing._labelnames) != tuple(labels):
                raise ValueError(f"metric {full} already declared with another type or labels")
            return existing
        metric = cls(full, documentation, list(labels), registry=REGISTRY, **kwargs)
        _metrics[full] = metric
        return metric


def counter(name: str, documentation: str, labels: t.Sequence[str] = ()) -> Counter:
    """A counter in the controller's registry (``_total`` is added to the exposed name by prometheus-client)."""
    return _declare(Counter, name.removesuffix("_total"), documentation, labels)


def gauge(name: str, documentation: str, labels: t.Sequence[str] = ()) -> Gauge:
    return _declare(Gauge, name, documentation, labels)


def histogram(name: str, documentation: str, labels: t.Sequence[str] = (),
              buckets: t.Sequence[float] = Histogram.DEFAULT_BUCKETS) -> Histogram:
    return _declare(Histogram, name, documentation, labels, buckets=tuple(buckets))


def register_collector(collector: Collector) -> None:
    """Add a custom collector (its ``collect()`` runs on every scrape, in the HTTP server's thread)."""
    REGISTRY.register(collector)


def unregister_collector(collector: Collector) -> None:
    try:
        REGISTRY.unregister(collector)
    except KeyError:
        pass


def serve(port: int, addr: str = "0.0.0.0") -> t.Any:
    """Expose the registry on ``http://addr:port/metrics`` from a daemon thread; None when port is 0."""
    if not port:
        return None
    from prometheus_client import start_http_server
    server, _thread = start_http_server(port, addr=addr, registry=REGISTRY)
    return server


# ---------------------------------------------------------------------------------------------
# Event metrics: counted where they happen
# ---------------------------------------------------------------------------------------------

RECONCILE_DURATION = histogram(
    "reconcile_duration_seconds", "Time one reconcile took, by kind (successful and failed ones).", ["kind"],
    buckets=RECONCILE_BUCKETS)
RECONCILE_ERRORS = counter(
    "reconcile_errors_total", "Reconciles that raised, by kind and exception type (retried with backoff).",
    ["kind", "error"])
RECONCILE_CONFLICTS = counter(
    "reconcile_conflicts_total", "Reconciles whose write met a newer version of the object (retried at once).",
    ["kind"])
PLACEMENT_DURATION = histogram(
    "placement_duration_seconds", "Time from the controller first seeing a guest that should run without a host "
    "to the planner placing it, by zone.", ["zone"], buckets=PLACEMENT_BUCKETS)
PLACEMENT_FAILURES = counter(
    "placement_failures_total", "Planner decisions that found no host (a waiting guest is retried whenever capacity "
    "changes, and counted each time), by zone and reason.", ["zone", "reason"])
HA_RESTARTS = counter(
    "ha_restarts_total", "HA guests placed again on another host because theirs was found Down (fenced).")
HOST_TRANSITIONS = counter(
    "host_state_transitions_total", "Host connection state changes recorded by the host monitor (Connecting, Up, "
    "Disconnected, Alert, Down).", ["from_state", "to_state"])


async def timed_reconcile(kind: str, reconcile: t.Awaitable[t.Any]) -> t.Any:
    """Await one reconcile, recording its duration and, when it raises, its error (then re-raised)."""
    started = time.monotonic()
    try:
        return await reconcile
    except Exception as error:
        if type(error).__name__ == "Conflict":
            RECONCILE_CONFLICTS.labels(kind=kind).inc()
        else:
            RECONCILE_ERRORS.labels(kind=kind, error=type(error).__name__).inc()
        raise
    finally:
        RECONCILE_DURATION.labels(kind=kind).observe(time.monotonic() - started)


class PlacementClock:
    """When each guest waiting for a host was first seen waiting, for ``cumulo_placement_duration_seconds``.

    Kept in memory: after a controller restart, a guest still waiting counts from when the new process saw it.
    """

    def __init__(self) -> None:
        self._since: dict[str, float] = {}

    def waiting(self, key: str) -> None:
        self._since.setdefault(key, time.monotonic())

    def placed(self, key: str, zone: str) -> None:
        since = self._since.pop(key, None)
        if since is not None:
            PLACEMENT_DURATION.labels(zone=zone).observe(time.monotonic() - since)

    def failed(self, key: str, zone: str, reason: str) -> None:
        self.waiting(key)
        PLACEMENT_FAILURES.labels(zone=zone, reason=reason).inc()

    def forget(self, key: str) -> None:
        self._since.pop(key, None)


def host_transition(old: t.Any, new: t.Any) -> None:
    """Count a Host's connection state change (``old``/``new``: HostState or None)."""
    if old != new and new is not None:
        HOST_TRANSITIONS.labels(from_state=getattr(old, "value", old) or "None",
                                to_state=getattr(new, "value", new)).inc()


# ---------------------------------------------------------------------------------------------
# State metrics: computed from the runtime's Store at scrape time
# ---------------------------------------------------------------------------------------------

MIB = 1024**2


def _snapshot(values: t.Callable[[], list[t.Any]]) -> list[t.Any]:
    """Objects copied out of a store dict the event loop may be changing in another thread. ``list(dict.values())``
    runs in C under the GIL; a resize racing it raises, so try again."""
    for _ in range(5):
        try:
            return values()
        except RuntimeError:
            continue
    return []


def _enum(value: t.Any, default: str = "Unknown") -> str:
    value = getattr(value, "value", value)
    return str(value) if value else default


class RuntimeCollector(Collector):
    """Objects per kind and phase, Ready reasons, hosts by state, capacity and the work queue, from one
    :class:`controllers.runtime.Runtime` (its Store and WorkQueue), computed on every scrape.

    Objects are the parsed models the store holds, replaced (never mutated) on each watch event, so a copied
    list can be read from the HTTP server's thread.
    """

    def __init__(self, runtime: t.Any):
        self.runtime = runtime

    def _objects(self, plural: str) -> list[t.Any]:
        store = self.runtime.store
        if plural not in store.kinds:
            return []
        return _snapshot(lambda: store.list(plural))

    def describe(self) -> t.Iterable[t.Any]:
        return list(self._families())  # names and types only; cheap enough on an empty or full store

    def collect(self) -> t.Iterable[t.Any]:
        return self._families()

    def _families(self) -> t.Iterator[t.Any]:
        from prometheus_client.core import GaugeMetricFamily

        runtime = self.runtime
        queue = runtime.queue
        depth = GaugeMetricFamily(PREFIX + "workqueue_depth", "Keys waiting for a reconcile worker.")
        depth.add_metric([], len(queue))
        yield depth
        active = GaugeMetricFamily(PREFIX + "workqueue_active", "Keys being reconciled right now.")
        active.add_metric([], len(getattr(queue, "_active", ())))
        yield active
        delayed = GaugeMetricFamily(PREFIX + "workqueue_delayed",
                                    "Keys waiting for a requeue timer (backoff, time-based transitions).")
        delayed.add_metric([], len(getattr(queue, "_timers", ())))
        yield delayed
        workers = GaugeMetricFamily(PREFIX + "reconcile_workers", "Concurrent reconcile workers.")
        workers.add_metric([], runtime.worker_count)
        yield workers
        leading = runtime.started.is_set()
        role = GaugeMetricFamily(PREFIX + "controller_active", "1 on the replica that reconciles (the leader), 0 on "
                                 "a standby. Object, host and capacity gauges come from the active replica only.")
        role.add_metric([], 1 if leading else 0)
        yield role

        objects = GaugeMetricFamily(PREFIX + "objects", "Cumulo objects by kind and status.phase (Unknown: not "
                                    "reconciled yet).", labels=["kind", "phase"])
        not_ready = GaugeMetricFamily(PREFIX + "objects_not_ready", "Cumulo objects whose Ready condition is not "
                                      "True, by kind and the condition's reason.", labels=["kind", "reason"])
        hosts: list[t.Any] = []
        vms: list[t.Any] = []
        pools: list[t.Any] = []
        for plural, kind in sorted(runtime.store.kinds.items()):
            if kind.group != "cumulo.io":
                continue
            items = self._objects(plural) if leading else []
            if plural == "hosts":
                hosts = items
            elif plural == "virtualmachines":
                vms = items
            elif plural == "storagepools":
                pools = items
            phases: dict[str, int] = {}
            reasons: dict[str, int] = {}
            for obj in items:
                status = getattr(obj, "status", None)
                phase = _enum(getattr(status, "phase", None))
                phases[phase] = phases.get(phase, 0) + 1
                ready = next((c for c in getattr(status, "conditions", None) or () if c.type == "Ready"), None)
                if ready is None or _enum(ready.status) != "True":
                    reason = (ready.reason if ready else None) or "NotReconciled"
                    reasons[reason] = reasons.get(reason, 0) + 1
            for phase, count in sorted(phases.items()):
                objects.add_metric([kind.kind, phase], count)
            for reason, count in sorted(reasons.items()):
                not_ready.add_metric([kind.kind, reason], count)
        yield objects
        yield not_ready
        yield from self._hosts(hosts)
        yield from self._guests(vms)
        yield from self._pools(pools)

    def _hosts(self, hosts: list[t.Any]) -> t.Iterator[t.Any]:
        from prometheus_client.core import GaugeMetricFamily

        by_state = GaugeMetricFamily(PREFIX + "hosts", "Hosts by zone, cluster, connection state and resource state.",
                                     labels=["zone", "cluster", "state", "resource_state"])
        location = ["zone", "pod", "cluster", "host"]
        cpu_capacity = GaugeMetricFamily(PREFIX + "host_cpu_capacity_cores", "Virtual CPU cores a host offers to "
                                         "placements (after the cluster's overcommit ratio).", labels=location)
        cpu_allocated = GaugeMetricFamily(PREFIX + "host_cpu_allocated_cores", "Virtual CPU cores reserved by guests "
                                          "placed on a host.", labels=location)
        memory_capacity = GaugeMetricFamily(PREFIX + "host_memory_capacity_bytes", "Memory a host offers to placements "
                                            "(after the cluster's overcommit ratio).", labels=location)
        memory_allocated = GaugeMetricFamily(PREFIX + "host_memory_allocated_bytes", "Memory reserved by guests "
                                             "placed on a host.", labels=location)
        guests = GaugeMetricFamily(PREFIX + "host_virtual_machines", "Guests placed on a host.", labels=location)
        counts: dict[tuple[str, ...], int] = {}
        for host in hosts:
            status = host.status
            zone, pod, cluster = status.zone or "", status.pod or "", host.spec.cluster
            key = (zone, cluster, _enum(status.state), _enum(status.resource_state))
            counts[key] = counts.get(key, 0) + 1
            labels = [zone, pod, cluster, host.metadata.name]
            if status.capacity is not None:
                cpu_capacity.add_metric(labels, status.capacity.cpu_cores.total)
                cpu_allocated.add_metric(labels, status.capacity.cpu_cores.allocated)
                memory_capacity.add_metric(labels, status.capacity.memory_mib.total * MIB)
                memory_allocated.add_metric(labels, status.capacity.memory_mib.allocated * MIB)
            guests.add_metric(labels, status.virtual_machines or 0)
        for key, count in sorted(counts.items()):
            by_state.add_metric(list(key), count)
        yield from (by_state, cpu_capacity, cpu_allocated, memory_capacity, memory_allocated, guests)

    def _guests(self, vms: list[t.Any]) -> t.Iterator[t.Any]:
        from prometheus_client.core import GaugeMetricFamily

        unscheduled = GaugeMetricFamily(PREFIX + "virtualmachines_unscheduled", "Guests that should run but have no "
                                        "host, by zone and the Scheduled condition's reason.", labels=["zone", "reason"])
        counts: dict[tuple[str, str], int] = {}
        for vm in vms:
            scheduled = next((c for c in vm.status.conditions if c.type == "Scheduled"), None)
            if scheduled is not None and _enum(scheduled.status) == "False":
                key = (vm.spec.zone, scheduled.reason or "Unknown")
                counts[key] = counts.get(key, 0) + 1
        for key, count in sorted(counts.items()):
            unscheduled.add_metric(list(key), count)
        yield unscheduled

    def _pools(self, pools: list[t.Any]) -> t.Iterator[t.Any]:
        from prometheus_client.core import GaugeMetricFamily

        labels = ["zone", "scope", "pool"]
        capacity = GaugeMetricFamily(PREFIX + "storagepool_capacity_bytes", "Physical capacity of a primary storage "
                                     "pool.", labels=labels)
        allocated = GaugeMetricFamily(PREFIX + "storagepool_allocated_bytes", "Sum of the virtual sizes of the volumes "
                                      "on a primary storage pool.", labels=labels)
        for pool in pools:
            values = [pool.spec.zone, _enum(pool.spec.scope), pool.metadata.name]
            if pool.status.capacity_bytes is not None:
                capacity.add_metric(values, pool.status.capacity_bytes)
            if pool.status.allocated_bytes is not None:
                allocated.add_metric(values, pool.status.allocated_bytes)
        yield capacity
        yield allocated


_runtime_collector: RuntimeCollector | None = None


def watch_runtime(runtime: t.Any) -> RuntimeCollector:
    """Export ``runtime``'s state (replacing the runtime exported before, if any)."""
    global _runtime_collector
    with _lock:
        if _runtime_collector is not None:
            unregister_collector(_runtime_collector)
        _runtime_collector = RuntimeCollector(runtime)
        register_collector(_runtime_collector)
        return _runtime_collector
