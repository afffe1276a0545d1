"""Prometheus metrics of cumulo-agent (``--metrics-port``, default 9180; 0 turns the server off).

Nothing in the drivers knows about metrics. :func:`instrument` wraps, on each driver *instance* the agent's
host workers use, the operations worth timing (the instance keeps its class, so ``isinstance`` checks and
shared drivers work as before), the heartbeat's renewal and the virtual router's apply. What the host
worker gathers (facts, storage and bridge checks) is read at scrape time from the workers by
:class:`AgentCollector`, and domains per state follow every ``domains()`` listing (the VM sweep's, and a
refresh every ``DOMAIN_REFRESH_SECONDS``).

Every series has a ``host`` label: with ``--simulate N`` one process runs N hosts, each with its own
hypervisor and storage drivers. A driver object several simulated hosts share (the simulator network
driver, a filesystem storage driver) is labelled ``host="shared"``.

The agent keeps its own registry (``REGISTRY``): hostagent imports nothing from controllers but the API.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
import time
import typing as t

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

PREFIX = "cumulo_agent_"
DEFAULT_PORT = 9180
SHARED = "shared"
DOMAIN_REFRESH_SECONDS = 15.0

disable_created_metrics()
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

# Driver calls range from microseconds (simulator) to minutes (a template download, a guest's shutdown).
OPERATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
HEARTBEAT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

OPERATION_DURATION = Histogram(
    PREFIX + "driver_operation_duration_seconds", "Time a driver operation took (failed ones too), by host, driver "
    "(hypervisor, storage, network, router) and operation.", ["host", "driver", "operation"],
    buckets=OPERATION_BUCKETS, registry=REGISTRY)
OPERATION_FAILURES = Counter(
    PREFIX + "driver_operation_failures", "Driver operations that raised, by host, driver, operation and error type.",
    ["host", "driver", "operation", "error"], registry=REGISTRY)
DOMAINS = Gauge(
    PREFIX + "domains", "Cumulo's domains on the host's hypervisor by state (running, paused, shutoff, ...), as last "
    "listed.", ["host", "state"], registry=REGISTRY)
HEARTBEAT_DURATION = Histogram(
    PREFIX + "heartbeat_renew_duration_seconds", "Time one heartbeat Lease renewal took.", ["host"],
    buckets=HEARTBEAT_BUCKETS, registry=REGISTRY)
HEARTBEAT_FAILURES = Counter(
    PREFIX + "heartbeat_failures", "Heartbeat renewals that did not refresh the Lease, by reason (unreachable, "
    "fault, no-namespace, error-<HTTP status>, conflict).", ["host", "reason"], registry=REGISTRY)
HEARTBEAT_LAST = Gauge(
    PREFIX + "heartbeat_last_success_timestamp_seconds", "Unix time of the last successful Lease renewal.", ["host"],
    registry=REGISTRY)

# The operations worth timing, per driver interface (queries included: a slow libvirtd shows there first).
OPERATIONS = {
    "hypervisor": ("host_facts", "start", "shutdown", "destroy", "domains", "domain", "attach_disk", "detach_disk",
                   "block_resize"),
    "storage": ("check", "disk_info", "create_disk", "resize_disk", "delete_disk", "download_template",
                "delete_template"),
    "network": ("bridge_exists", "ensure_segment", "plug", "unplug", "release_segment"),
}
DOMAIN_STATES = ("running", "paused", "stopping", "shutoff", "crashed", "suspended", "unknown")


def _timed(function: t.Callable[..., t.Awaitable[t.Any]], host: str | t.Callable[..., str], driver: str,
           operation: str, observe: t.Callable[[str, t.Any], None] | None = None) -> t.Callable[..., t.Any]:
    @functools.wraps(function)
    async def wrapper(*args: t.Any, **kwargs: t.Any) -> t.Any:
        label = host(*args, **kwargs) if callable(host) else host
        started = time.monotonic()
        try:
            result = await function(*args, **kwargs)
        except asyncio.CancelledError:
            raise  # the agent stopping or a deadline elsewhere: not the driver's failure
        except Exception as error:
            OPERATION_DURATION.labels(label, driver, operation).observe(time.monotonic() - started)
            OPERATION_FAILURES.labels(label, driver, operation, type(error).__name__).inc()
            raise
        OPERATION_DURATION.labels(label, driver, operation).observe(time.monotonic() - started)
        if observe is not None:
            observe(label, result)
        return result

    wrapper.__cumulo_metrics__ = True  # type: ignore[attr-defined]
    return wrapper


def record_domains(host: str, domains: t.Iterable[t.Any]) -> None:
    """Domains per state on ``host`` from a full listing (states absent now drop to 0)."""
    counts = dict.fromkeys(DOMAIN_STATES, 0)
    for domain in domains:
        if getattr(domain, "owner", None) is not None:
            counts[domain.state] = counts.get(domain.state, 0) + 1
    for state, count in counts.items():
        DOMAINS.labels(host, state).set(count)


def instrument_driver(driver: t.Any, kind: str, host: str) -> None:
    """Time ``driver``'s operations of interface ``kind`` (idempotent; the instance keeps its class)."""
    for operation in OPERATIONS[kind]:
        method = getattr(driver, operation, None)
        if method is None or getattr(method, "__cumulo_metrics__", False) or not inspect.iscoroutinefunction(method):
            continue
        observe = record_domains if (kind, operation) == ("hypervisor", "domains") and host != SHARED else None
        setattr(driver, operation, _timed(method, host, kind, operation, observe))


def instrument_heartbeat(heartbeat: t.Any) -> None:
    renew = heartbeat.renew
    if getattr(renew, "__cumulo_metrics__", False):
        return
    host = heartbeat.host

    @functools.wraps(renew)
    async def timed_renew() -> bool:
        started = time.monotonic()
        try:
            fresh = await renew()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            HEARTBEAT_FAILURES.labels(host, type(error).__name__).inc()
            raise
        finally:
            HEARTBEAT_DURATION.labels(host).observe(time.monotonic() - started)
        if fresh:
            HEARTBEAT_LAST.labels(host).set(time.time())
        else:
            # The heartbeat's own state says why (it logs each change once).
            state = getattr(heartbeat, "_state", "")
            HEARTBEAT_FAILURES.labels(host, state if state not in ("ok", "starting") else "conflict").inc()
        return fresh

    timed_renew.__cumulo_metrics__ = True  # type: ignore[attr-defined]
    heartbeat.renew = timed_renew


def instrument(agent: t.Any) -> list[t.Coroutine[t.Any, t.Any, None]]:
    """Instrument the agent's workers, drivers and router runtime and export its host reports; returns the
    background coroutines to run alongside the workers (the domain refresh)."""
    users: dict[int, set[str]] = {}
    for worker in agent.workers.values():
        for driver in (worker.hypervisor, worker.storage, worker.network):
            users.setdefault(id(driver), set()).add(worker.name)
    for worker in agent.workers.values():
        for kind, driver in (("hypervisor", worker.hypervisor), ("storage", worker.storage),
                             ("network", worker.network)):
            instrument_driver(driver, kind, worker.name if len(users[id(driver)]) == 1 else SHARED)
        instrument_heartbeat(worker.heartbeat)
    routers = getattr(agent, "routers", None)
    runtime = getattr(routers, "runtime", None)
    if runtime is not None and not getattr(runtime.apply, "__cumulo_metrics__", False):
        # One runtime serves every host of the agent; the router's spec names the host it is applied for.
        runtime.apply = _timed(runtime.apply, lambda spec, **_: getattr(spec, "host", SHARED) or SHARED, "router",
                               "apply")
    watch_agent(agent)
    return [refresh_domains(agent)]


async def refresh_domains(agent: t.Any, interval: float | None = None) -> None:
    """List each host's domains every ``interval`` seconds, so ``cumulo_agent_domains`` stays current between
    the VM sweeps."""
    interval = interval or DOMAIN_REFRESH_SECONDS
    while True:
        seen: set[int] = set()
        for worker in list(agent.workers.values()):
            if id(worker.hypervisor) in seen:
                continue
            seen.add(id(worker.hypervisor))
            try:
                await asyncio.wait_for(worker.hypervisor.domains(), agent.config.call_timeout)
            except asyncio.CancelledError:
                raise
            except Exception:  # counted as a failure of the operation; the host report says more
                pass
        await asyncio.sleep(interval)


# ---------------------------------------------------------------------------------------------
# Host reports, at scrape time
# ---------------------------------------------------------------------------------------------


class AgentCollector(Collector):
    """What each host worker last gathered and reported (``status.node``): facts, health, storage, bridges."""

    def __init__(self, agent: t.Any):
        self.agent = agent

    def describe(self) -> t.Iterable[t.Any]:
        return list(self._families([]))

    def collect(self) -> t.Iterable[t.Any]:
        for _ in range(5):  # the event loop may change the dict while this thread copies it
            try:
                workers = list(self.agent.workers.values())
                break
            except RuntimeError:
                continue
        else:
            workers = []
        return self._families(workers)

    def _families(self, workers: list[t.Any]) -> t.Iterator[t.Any]:
        hosts = GaugeMetricFamily(PREFIX + "hosts", "Hosts this agent process runs (N with --simulate N).")
        hosts.add_metric([], len(workers))
        healthy = GaugeMetricFamily(PREFIX + "hypervisor_healthy", "1 when the host's last hypervisor check "
                                    "succeeded, 0 when it failed.", labels=["host"])
        cpus = GaugeMetricFamily(PREFIX + "host_cpu_cores", "CPU cores the hypervisor reports.", labels=["host"])
        speed = GaugeMetricFamily(PREFIX + "host_cpu_speed_mhz", "CPU speed the hypervisor reports.", labels=["host"])
        memory = GaugeMetricFamily(PREFIX + "host_memory_bytes", "Memory the hypervisor reports usable by guests.",
                                   labels=["host"])
        storage_labels = ["host", "type", "name"]
        reachable = GaugeMetricFamily(PREFIX + "storage_reachable", "1 when the host reaches a primary pool "
                                      "(type=pool) or image store (type=imagestore).", labels=storage_labels)
        capacity = GaugeMetricFamily(PREFIX + "storage_capacity_bytes", "Size of the filesystem holding a pool or "
                                     "store, seen from the host.", labels=storage_labels)
        used = GaugeMetricFamily(PREFIX + "storage_used_bytes", "Space used on the filesystem holding a pool or "
                                 "store, seen from the host.", labels=storage_labels)
        bridges = GaugeMetricFamily(PREFIX + "bridge_present", "1 when the traffic-label bridge exists on the host.",
                                    labels=["host", "label"])
        for worker in workers:
            name = worker.name
            node = worker.reported or {}
            if node.get("hypervisorHealthy") is not None:
                healthy.add_metric([name], 1 if node["hypervisorHealthy"] else 0)
            facts = worker.facts
            if facts is not None:
                if facts.cpu_cores is not None:
                    cpus.add_metric([name], facts.cpu_cores)
                if facts.cpu_speed_mhz is not None:
                    speed.add_metric([name], facts.cpu_speed_mhz)
                if facts.memory_mib is not None:
                    memory.add_metric([name], facts.memory_mib * 1024**2)
            for kind, key in (("pool", "storagePools"), ("imagestore", "imageStores")):
                for target, report in sorted((node.get(key) or {}).items()):
                    labels = [name, kind, target]
                    reachable.add_metric(labels, 1 if report.get("reachable") else 0)
                    if report.get("capacityBytes") is not None:
                        capacity.add_metric(labels, report["capacityBytes"])
                    if report.get("usedBytes") is not None:
                        used.add_metric(labels, report["usedBytes"])
            for label, present in sorted((node.get("bridges") or {}).items()):
                bridges.add_metric([name, label], 1 if present else 0)
        yield from (hosts, healthy, cpus, speed, memory, reachable, capacity, used, bridges)


_lock = threading.Lock()
_collector: AgentCollector | None = None


def watch_agent(agent: t.Any) -> AgentCollector:
    """Export ``agent``'s host reports (replacing the agent exported before: tests run several in one process)."""
    global _collector
    with _lock:
        if _collector is not None:
            REGISTRY.unregister(_collector)
        _collector = AgentCollector(agent)
        REGISTRY.register(_collector)
        return _collector


def serve(port: int, addr: str = "0.0.0.0") -> t.Any:
    """Serve ``REGISTRY`` at ``http://addr:port/metrics`` from a daemon thread; None when ``port`` is 0."""
    if not port:
        return None
    from prometheus_client import start_http_server
    server, _thread = start_http_server(port, addr=addr, registry=REGISTRY)
    return server
