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
