"""The controller's list+watch of each kind, feeding the runtime's store (controllers/runtime.py).

Why not kopf's watch streams (used until issue 10's scale run): kopf runs its whole per-object machinery for
every event — a worker task and a memory per object, handler selection, diff-base and progress lookups —
before an ``on.event`` handler sees it; in the controller's profile during a 2,000-guest start that took more
CPU than the runtime's own handling of the events, and its per-object memories grow with every object ever
seen. The runtime needs only the raw objects in order, and a relist that tells it what exists.

One thread per kind lists (paged, so 10,000 guests never sit in memory as one JSON answer) and watches, and
hands events to the event loop in batches (one wake-up per batch, not per event). A broken stream resumes
from the last resourceVersion; an expired one (410 Gone, as after an apiserver restart) is listed again, and
the listing ends with the keys that exist, so the runtime drops what was deleted meanwhile. Failures back off
with jitter from 0.5 s to 30 s. ``metadata.managedFields`` is dropped in the thread, before the object reaches
the loop.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import random
import threading
import time
import typing as t

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from controllers.runtime import LISTED, Kind, Key, key_of, slim

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
PAGE_SIZE = 500

Sink = t.Callable[[str, t.Any], None]
"""(event type: ADDED, MODIFIED, DELETED or LISTED; object), called on the event loop."""


class WatchFailed(Exception):
    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(f"{status or 'unreachable'}: {message}")
        self.status = status


class Expired(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


def collection_path(kind: Kind) -> str:
    return f"/apis/{kind.group}/{kind.version}/{kind.plural}" if kind.group else f"/api/v1/{kind.plural}"


class Informer:
    """List+watch of one kind in a thread; events reach ``sink`` on the event loop, in order."""

    def __init__(self, api_client: client.ApiClient, kind: Kind, sink: Sink, *, page_size: int = PAGE_SIZE) -> None:
        self.api = api_client
        self.kind = kind
        self.sink = sink
        self.page_size = page_size
        self.path = collection_path(kind)
        self.query: dict[str, t.Any] = {"labelSelector": kind.selector} if kind.selector else {}
        self.synced = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: collections.deque[tuple[str, t.Any]] = collections.deque()
        self._scheduled = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._response: t.Any = None
        self._thread: threading.Thread | None = None

    # -- event loop side ----------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"watch-{self.kind.plural}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        response = self._response
        sock = getattr(getattr(response, "connection", None), "sock", None)
        if sock is not None:  # unblock the thread's read at once
            try:
                sock.shutdown(2)
            except OSError:
                pass

    def _drain(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, collections.deque()
            self._scheduled = False
        for event_type, obj in batch:
            try:
                self.sink(event_type, obj)
            except Exception:  # one bad object must not stop the others
                log.exception("handling a %s event of %s failed", event_type, self.kind.plural)
            if event_type == LISTED:
                self.synced.set()

    # -- thread side --------------------------------------------------------------------------------

    def _post(self, event_type: str, obj: t.Any) -> None:
        assert self._loop is not None
        with self._lock:
            self._pending.append((event_type, obj))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: the controller is exiting
            self._stop.set()

    def _item(self, obj: dict, api_version: str | None = None) -> dict:
        slim(obj)
        if api_version:  # list items carry no apiVersion/kind
            obj.setdefault("apiVersion", api_version)
            obj.setdefault("kind", self.kind.kind)
        return obj

    def _send(self, query: dict[str, t.Any], timeout: float) -> t.Any:
        method, url, headers, body, _ = self.api.param_serialize(
            "GET", self.path, query_params=list(query.items()), header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"])
        try:
            response = self.api.call_api(method, url, headers, body, _request_timeout=(CONNECT_TIMEOUT, timeout))
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise WatchFailed(None, str(error)) from None
        except ApiException as error:
            raise WatchFailed(error.status or None, str(error.reason)) from None
        if not 200 <= response.status < 300:
            data = response.read()
            response.response.release_conn()
            if response.status == 410:
                raise Expired()
            raise WatchFailed(response.status, data[:300].decode(errors="replace"))
        return response

    def _list(self) -> str:
        """Every object, page by page, then LISTED with their keys; returns the listing's resourceVersion."""
        keys: set[Key] = set()
        query: dict[str, t.Any] = {**self.query, "limit": self.page_size}
        while True:
            response = self._send(query, 60)
            try:
                answer = json.loads(response.read())
            except (urllib3.exceptions.HTTPError, OSError) as error:
                raise WatchFailed(None, str(error)) from None
            api_version = answer.get("apiVersion") or self.kind.api_version
            for item in answer.get("items") or ():
                self._item(item, api_version)
                keys.add(key_of(self.kind.plural, item))
                self._post("ADDED", item)
            metadata = answer.get("metadata") or {}
            if not metadata.get("continue"):
                self._post(LISTED, keys)
                return str(metadata.get("resourceVersion", ""))
            query["continue"] = metadata["continue"]

    def _watch(self, resource_version: str) -> str:
        """Follow one watch request until the server ends it; returns the resourceVersion to resume from."""
        timeout = random.randint(240, 360)
        query = {**self.query, "watch": "true", "allowWatchBookmarks": "true", "timeoutSeconds": timeout,
                 "resourceVersion": resource_version}
        response = self._send(query, timeout + 30)
        self._response = response.response
        try:
            for line in iter_resp_lines(response.response):
                if self._stop.is_set():
                    break
                if not line:
                    continue
                event = json.loads(line)
                event_type, obj = event.get("type"), event.get("object") or {}
                if event_type == "ERROR":
                    if obj.get("code") == 410:
                        raise Expired()
                    raise WatchFailed(obj.get("code"), str(obj.get("message", "")))
                resource_version = (obj.get("metadata") or {}).get("resourceVersion") or resource_version
                if event_type in ("ADDED", "MODIFIED", "DELETED"):
                    self._post(event_type, self._item(obj))
        except (urllib3.exceptions.HTTPError, OSError) as error:
            if not self._stop.is_set():
                raise WatchFailed(None, f"watch {self.path}: {error}") from None
        finally:
            self._response = None
            response.response.close()
            response.response.release_conn()
        return resource_version

    def _run(self) -> None:
        delay, failing = 0.5, False
        resource_version: str | None = None
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                if resource_version is None:
                    resource_version = self._list()
                    if failing:
                        log.info("list/watch of %s recovered", self.kind.plural)
                        failing = False
                resource_version = self._watch(resource_version)
                if time.monotonic() - started > 5:
                    delay = 0.5
                    continue
            except Expired:
                log.info("watch of %s expired; listing again", self.kind.plural)
                resource_version = None
                continue
            except WatchFailed as error:
                if self._stop.is_set():
                    break
                if not failing:
                    log.warning("list/watch of %s failed (%s); retrying with backoff", self.kind.plural, error)
                failing = True
                if error.status in (403, 404):
                    resource_version = None
            except Exception:  # a bug must not end the watch for good
                log.exception("list/watch of %s failed", self.kind.plural)
                resource_version, failing = None, True
            # A watch that ends at once, again and again, must not become a hot loop.
            self._stop.wait(random.uniform(delay / 2, delay))
            delay = min(delay * 2, 30.0)
