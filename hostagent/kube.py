"""The agent's Kubernetes API access: raw JSON requests and list+watch informers.

Why the ``kubernetes`` client in threads rather than kopf: the agent is not an operator — it has no
handlers to run per object, persists nothing on objects, and most of its API traffic is writes
(Lease renewals, status.node patches) that kopf has no public client for. kopf would bring its
operator machinery (peering, discovery scans, handler progress) for four small caches. The
``kubernetes`` client gives kubeconfig/in-cluster/token-refresh handling; requests go through its
generic ``param_serialize``/``call_api`` with raw JSON, skipping the slow model deserialisation.
Blocking calls run in a bounded thread pool (:class:`AsyncKube`); each watch runs in its own thread
and hands events to the event loop, where the caches live (no locking).

Watches survive apiserver restarts: a broken stream is resumed from the last resourceVersion, an
expired one (410 Gone) is relisted, and failures back off exponentially with jitter (0.5 s → 30 s).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import random
import threading
import time
import typing as t
from collections.abc import Callable, Iterator, Mapping
from urllib.parse import quote

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from kubernetes.watch.watch import iter_resp_lines

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
NUDGE_SPACING = 1.0
MERGE_PATCH = "application/merge-patch+json"


class KubeError(Exception):
    """An API request failed. ``status`` is None when the apiserver could not be reached."""

    def __init__(self, status: int | None, reason: str, message: str, details: Mapping[str, t.Any] | None = None):
        super().__init__(f"{status or 'unreachable'} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.details = dict(details or {})

    @property
    def unavailable(self) -> bool:
        return self.status is None or self.status in (429, 500, 502, 503, 504)


class Expired(Exception):
    """The watch's resourceVersion is too old (410 Gone): relist."""


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


class Kube:
    """Blocking JSON requests to the apiserver; thread-safe (urllib3 connection pool)."""

    def __init__(self, configuration: k8s.Configuration, *, user_agent: str, max_connections: int = 16) -> None:
        # Connection errors are retried a little (a pooled connection may be stale after an
        # apiserver restart); read errors are not: a POST/PATCH may have been applied. A 429 or 503
        # comes back as an answer (KubeError), the caller's backoff handles it.
        configuration.retries = urllib3.Retry(total=1, connect=1, read=0, status=0, redirect=0, backoff_factor=0.2,
                                              respect_retry_after_header=False)
        configuration.connection_pool_maxsize = max_connections
        self.server = configuration.host
        self._api = k8s.ApiClient(configuration)
        self._api.user_agent = user_agent

    def close(self) -> None:
        self._api.close()

    def _send(self, method: str, path: str, query: Mapping[str, t.Any] | None, body: t.Any,
              content_type: str, timeout: tuple[float, float]) -> t.Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        method, url, headers, body, _ = self._api.param_serialize(
            method, path, query_params=list((query or {}).items()), header_params=headers, body=body,
            auth_settings=["BearerToken"])
        try:
            return self._api.call_api(method, url, headers, body, _request_timeout=timeout)
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise KubeError(None, "Unavailable", f"{self.server}: {error}") from None
        except ApiException as error:  # status 0: TLS errors and the like
            raise KubeError(error.status or None, str(error.reason), str(error.body or error.reason)) from None

    @staticmethod
    def _error(status: int, data: bytes) -> KubeError:
        try:
            body = json.loads(data)
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        message = body.get("message", data[:200].decode(errors="replace"))
        return KubeError(status, str(body.get("reason", "")), str(message), body.get("details"))

    def request(self, method: str, path: str, *, query: Mapping[str, t.Any] | None = None, body: t.Any = None,
                content_type: str = "application/json", timeout: float = 10.0) -> t.Any:
        """One request; the decoded JSON answer. Raises :class:`KubeError`."""
        response = self._send(method, path, query, body, content_type, (CONNECT_TIMEOUT, timeout))
        try:
            data = response.read()
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise KubeError(None, "Unavailable", f"{self.server}: {error}") from None
        if not 200 <= response.status < 300:
            raise self._error(response.status, data)
        return json.loads(data)

    def watch(self, path: str, query: Mapping[str, t.Any], timeout_seconds: int,
              on_response: Callable[[t.Any], None]) -> Iterator[dict[str, t.Any]]:
        """The events of one watch request, until the server ends it after ``timeout_seconds``.
        ``on_response`` gets the open response so another thread can shut it down."""
        query = {**query, "watch": "true", "allowWatchBookmarks": "true", "timeoutSeconds": timeout_seconds}
        response = self._send("GET", path, query, None, "", (CONNECT_TIMEOUT, timeout_seconds + 30))
        try:
            if not 200 <= response.status < 300:
                raise self._error(response.status, response.read())
            on_response(response.response)
            try:
                for line in iter_resp_lines(response.response):
                    if line:
                        yield json.loads(line)
            except (urllib3.exceptions.HTTPError, OSError) as error:
                raise KubeError(None, "Unavailable", f"watch {path}: {error}") from None
        finally:
            # Closed, not returned to the pool as is: an unfinished stream leaves unread data behind.
            response.response.close()
            response.response.release_conn()


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


class Backoff:
    """Exponential backoff with full jitter between ``initial`` and ``maximum`` seconds."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0) -> None:
        self.initial, self.maximum = initial, maximum
        self._next = initial

    def reset(self) -> None:
        self._next = self.initial

    def next(self) -> float:
        delay = random.uniform(self._next / 2, self._next)
        self._next = min(self._next * 2, self.maximum)
        return delay


EventHandler = Callable[[str, "dict[str, t.Any] | None", "dict[str, t.Any] | None"], None]
"""(event type, old object, new object); called on the event loop."""


class Informer:
    """A list+watch cache of one collection, fed from a thread, read on the event loop.

    ``cache`` maps object name (``namespace/name`` when ``namespaced``) to its last seen JSON;
    ``on_event`` is called on the loop for every change (ADDED, MODIFIED, DELETED), including those a
    relist discovers.
    """

    def __init__(self, kube: Kube, kind: str, path: str, on_event: EventHandler, *,
                 field_selector: str | None = None, label_selector: str | None = None,
                 health: ApiHealth | None = None, page_size: int = 500, namespaced: bool = False) -> None:
        self.kube = kube
        self.kind = kind
        self.path = path
        self.on_event = on_event
        self.namespaced = namespaced
        self.query: dict[str, str] = {}
        if field_selector:
            self.query["fieldSelector"] = field_selector
        if label_selector:
            self.query["labelSelector"] = label_selector
        self.health = health
        if health is not None:
            health.informers.append(self)
        self.page_size = page_size
        self.cache: dict[str, dict[str, t.Any]] = {}
        self.synced = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._wakeup = threading.Event()  # ends a backoff early (stop, nudge)
        self._failing = False
        self._unavailable = False  # the last failure was an outage (unreachable, 429, 5xx)
        self._last_attempt = 0.0
        self._response: t.Any = None
        self._thread: threading.Thread | None = None

    # -- event loop side ------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"watch-{self.kind}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wakeup.set()
        response = self._response
        if response is not None:
            # Unblock the thread's read at once (see kubernetes.watch.Watch.stop).
            sock = getattr(getattr(response, "connection", None), "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(2)
                except OSError:
                    pass

    def nudge(self) -> None:
        """The apiserver answers again: retry now if the last failure was an outage (at most once a
        second). A refusal (403, 404) is not cured by the apiserver answering: it keeps its backoff."""
        if self._unavailable and time.monotonic() - self._last_attempt >= NUDGE_SPACING:
            self._wakeup.set()

    def key(self, obj: t.Mapping[str, t.Any]) -> str:
        """The cache key of ``obj``."""
        metadata = obj["metadata"]
        return f"{metadata.get('namespace', '')}/{metadata['name']}" if self.namespaced else metadata["name"]

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

    # -- thread side ------------------------------------------------------------------------------

    def _post(self, function: Callable[..., None], *args: t.Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(function, *args)
        except RuntimeError:  # the loop is closed: the agent is exiting
            self._stop.set()

    def _list(self) -> tuple[list[dict[str, t.Any]], str]:
        items: list[dict[str, t.Any]] = []
        query: dict[str, t.Any] = {**self.query, "limit": self.page_size}
        while True:
            answer = self.kube.request("GET", self.path, query=query, timeout=60)
            items.extend(answer.get("items") or [])
            metadata = answer.get("metadata") or {}
            if not metadata.get("continue"):
                return items, str(metadata.get("resourceVersion", ""))
            query["continue"] = metadata["continue"]

    def _watch(self, resource_version: str) -> str:
        """Follow one watch request; returns the resourceVersion to resume from."""
        timeout = random.randint(240, 360)  # spread the reconnects of many agents
        query = {**self.query, "resourceVersion": resource_version}

        def connected(response: t.Any) -> None:
            self._response = response
            self._recovered()

        try:
            for event in self.kube.watch(self.path, query, timeout, connected):
                if self._stop.is_set():
                    break
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Expired()
                    raise KubeError(obj.get("code"), str(obj.get("reason", "")), str(obj.get("message", "")))
                resource_version = (obj.get("metadata") or {}).get("resourceVersion") or resource_version
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self._post(self._apply, kind, obj)
        finally:
            self._response = None
        return resource_version

    def _recovered(self) -> None:
        self._unavailable = False
        if self._failing:
            self._failing = False
            log.info("list/watch recovered", extra={"kind": self.kind})
        if self.health is not None:
            self.health.succeeded()

    def _run(self) -> None:
        backoff = Backoff()
        resource_version: str | None = None
        last_status: int | None | str = "none"
        while not self._stop.is_set():
            self._last_attempt = started = time.monotonic()
            try:
                if resource_version is None:
                    items, resource_version = self._list()
                    self._post(self._replace, items)
                    self._recovered()
                    log.debug("listed", extra={"kind": self.kind, "count": len(items)})
                resource_version = self._watch(resource_version)
                if time.monotonic() - started > 5:
                    backoff.reset()
                    continue
                # A watch that ends at once, again and again, must not become a hot loop.
                delay = backoff.next()
            except Expired:
                log.info("watch expired; relisting", extra={"kind": self.kind})
                resource_version = None
                continue
            except KubeError as error:
                if self._stop.is_set():
                    break  # stop() shut the stream down
                if error.status is None and self.health is not None:
                    self.health.failed(error)
                if not self._failing or error.status != last_status:  # once per kind of failure
                    log.warning("list/watch failed; retrying with backoff",
                                extra={"kind": self.kind, "error": str(error)})
                self._failing, last_status, self._unavailable = True, error.status, error.unavailable
                if error.status in (403, 404):
                    resource_version = None  # CRD missing or forbidden: nothing to resume
                delay = backoff.next()
            except Exception:  # a bug must not kill the watch for good
                log.exception("watch thread error", extra={"kind": self.kind})
                resource_version, self._failing = None, True
                delay = backoff.next()
            self._wakeup.wait(delay)
            self._wakeup.clear()
