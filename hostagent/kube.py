"""The agent's Kubernetes API access: raw JSON requests and list+watch informers.

Why the ``kubernetes`` client in threads rather than kopf: the agent is not an operator — it has no
handlers to run per object, persists nothing on objects, and most of its API traffic is writes
(Lease renewals, status.node patches) that kopf has no public client for. kopf would bring its
operator machinery (peering, discovery scans, handler progress) for four small caches. The
``kubernetes`` client gives kubeconfig/in-cluster/token-refresh handling; requests go through
:class:`kubewatch.client.JsonClient` (raw JSON, skipping the slow model deserialisation), shared with the
controller. Blocking calls run in a bounded thread pool (:class:`AsyncKube`); each watch runs in its own
thread (:mod:`kubewatch.listwatch`, the controller's loop too) and hands events to the event loop, where the
caches live (no locking).

Watches survive apiserver restarts: a broken stream is resumed from the last resourceVersion, an
expired one (410 Gone) is relisted, and failures back off exponentially with jitter (0.5 s → 30 s).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
import typing as t
from collections.abc import Callable
from urllib.parse import quote

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.config.config_exception import ConfigException

from kubewatch.client import JsonClient, KubeError
from kubewatch.listwatch import PAGE_SIZE, Backoff, Expired, ListWatch

__all__ = ["ApiHealth", "AsyncKube", "Backoff", "Expired", "Informer", "Kube", "KubeError", "MERGE_PATCH",
           "load_configuration", "resource_path"]

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"


def load_configuration(kubeconfig: str | None) -> k8s.Configuration:
    """``--kubeconfig``, else $KUBECONFIG or ~/.kube/config, else the in-cluster service account."""
    configuration = k8s.Configuration()
    path = kubeconfig or os.environ.get("KUBECONFIG")
    if path or os.path.exists(os.path.expanduser("~/.kube/config")):
        k8s_config.load_kube_config(config_file=path, client_configuration=configuration)
    else:
        try:
            k8s_config.load_incluster_config(client_configuration=configuration)
        except ConfigException as error:
            raise ConfigException(f"no kubeconfig given (--kubeconfig, $KUBECONFIG, ~/.kube/config) and not "
                                  f"in a cluster: {error}") from None
    return configuration


class Kube(JsonClient):
    """Blocking JSON requests to the apiserver of ``configuration``; thread-safe (urllib3 connection pool)."""

    def __init__(self, configuration: k8s.Configuration, *, user_agent: str, max_connections: int = 16) -> None:
        # Connection errors are retried a little (a pooled connection may be stale after an
        # apiserver restart); read errors are not: a POST/PATCH may have been applied. A 429 or 503
        # comes back as an answer (KubeError), the caller's backoff handles it.
        configuration.retries = urllib3.Retry(total=1, connect=1, read=0, status=0, redirect=0, backoff_factor=0.2,
                                              respect_retry_after_header=False)
        configuration.connection_pool_maxsize = max_connections
        super().__init__(k8s.ApiClient(configuration))
        self.api.user_agent = user_agent


class ApiHealth:
    """Process-wide view of apiserver reachability, so an outage logs once, not once per host and call.

    A success also nudges informers that are waiting out a backoff: after an apiserver restart the
    watches come back with the first answered request (a heartbeat, every interval), not only after
    a backoff grown long during the outage.
    """

    def __init__(self) -> None:
        self._down_since: float | None = None
        self.informers: list[Informer] = []

    def failed(self, error: KubeError) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("apiserver unreachable; retrying with backoff", extra={"error": error.message})

    def succeeded(self) -> None:
        if self._down_since is not None:
            log.info("apiserver reachable again",
                        extra={"outage_seconds": round(time.monotonic() - self._down_since, 1)})
            self._down_since = None
        for informer in self.informers:
            informer.nudge()


class AsyncKube:
    """:class:`Kube` for coroutines: requests run in a bounded thread pool."""

    def __init__(self, kube: Kube, *, threads: int = 8) -> None:
        self.kube = kube
        self.health = ApiHealth()
        self._threads = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="kube")

    async def request(self, method: str, path: str, **kwargs: t.Any) -> t.Any:
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._threads, lambda: self.kube.request(method, path, **kwargs))
        except KubeError as error:
            if error.status is None:
                self.health.failed(error)
            else:
                self.health.succeeded()
            raise
        self.health.succeeded()
        return result

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        self.kube.close()


def resource_path(group: str, version: str, plural: str, name: str | None = None, *, namespace: str | None = None,
                  subresource: str | None = None) -> str:
    base = "/api/v1" if group == "" else f"/apis/{group}/{version}"
    if namespace is not None:
        base += f"/namespaces/{quote(namespace, safe='')}"
    base += f"/{plural}"
    if name is not None:
        base += f"/{quote(name, safe='')}"
    if subresource is not None:
        base += f"/{subresource}"
    return base


EventHandler = Callable[[str, "dict[str, t.Any] | None", "dict[str, t.Any] | None"], None]
"""(event type, old object, new object); called on the event loop."""


class Informer(ListWatch):
    """A list+watch cache of one collection, fed from a thread, read on the event loop.

    ``cache`` maps object name (``namespace/name`` when ``namespaced``) to its last seen JSON;
    ``on_event`` is called on the loop for every change (ADDED, MODIFIED, DELETED), including those a
    relist discovers.
    """

    def __init__(self, kube: Kube, kind: str, path: str, on_event: EventHandler, *,
                 field_selector: str | None = None, label_selector: str | None = None,
                 health: ApiHealth | None = None, page_size: int = PAGE_SIZE, namespaced: bool = False) -> None:
        query: dict[str, str] = {}
        if field_selector:
            query["fieldSelector"] = field_selector
        if label_selector:
            query["labelSelector"] = label_selector
        super().__init__(kube, kind, path, query, page_size=page_size, logger=log)
        self.kube = kube
        self.kind = kind
        self.on_event = on_event
        self.namespaced = namespaced
        self.health = health
        if health is not None:
            health.informers.append(self)
        self.cache: dict[str, dict[str, t.Any]] = {}
        self._items: list[dict[str, t.Any]] = []

    def key(self, obj: t.Mapping[str, t.Any]) -> str:
        """The cache key of ``obj``."""
        metadata = obj["metadata"]
        return f"{metadata.get('namespace', '')}/{metadata['name']}" if self.namespaced else metadata["name"]

    # -- event loop side ------------------------------------------------------------------------

    def _replace(self, items: list[dict[str, t.Any]]) -> None:
        old, new = self.cache, {self.key(item): item for item in items}
        self.cache = new
        for name, obj in new.items():
            before = old.get(name)
            if before is None:
                self.on_event("ADDED", None, obj)
            elif before["metadata"].get("resourceVersion") != obj["metadata"].get("resourceVersion"):
                self.on_event("MODIFIED", before, obj)
        for name, obj in old.items():
            if name not in new:
                self.on_event("DELETED", obj, None)
        self.synced.set()

    def _apply(self, kind: str, obj: dict[str, t.Any]) -> None:
        name = self.key(obj)
        before = self.cache.get(name)
        if kind == "DELETED":
            if self.cache.pop(name, None) is not None:
                self.on_event("DELETED", before, None)
            return
        if before is not None and before["metadata"].get("resourceVersion") == obj["metadata"].get("resourceVersion"):
            return
        self.cache[name] = obj
        self.on_event("ADDED" if before is None else "MODIFIED", before, obj)

    # -- thread side (the hooks of ListWatch) ---------------------------------------------------

    def list_page(self, answer: dict[str, t.Any], first: bool) -> None:
        if first:
            self._items = []
        self._items.extend(answer.get("items") or [])

    def list_done(self) -> None:
        items, self._items = self._items, []
        self.post(self._replace, items)
        log.debug("listed", extra={"kind": self.kind, "count": len(items)})

    def watch_event(self, event_type: str, obj: dict[str, t.Any]) -> None:
        self.post(self._apply, event_type, obj)

    def connected(self) -> None:
        if self.health is not None:
            self.health.succeeded()

    def failed(self, error: KubeError) -> None:
        if error.status is None and self.health is not None:
            self.health.failed(error)
