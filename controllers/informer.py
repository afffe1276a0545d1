"""The controller's list+watch of each kind, feeding the runtime's store (controllers/runtime.py).

Why not kopf's watch streams (used until issue 10's scale run): kopf runs its whole per-object machinery for
every event — a worker task and a memory per object, handler selection, diff-base and progress lookups —
before an ``on.event`` handler sees it; in the controller's profile during a 2,000-guest start that took more
CPU than the runtime's own handling of the events, and its per-object memories grow with every object ever
seen. The runtime needs only the raw objects in order, and a relist that tells it what exists.

The loop itself (paged listing, watch with bookmarks, 410 relist, backoff, stop) is :mod:`kubewatch.listwatch`,
shared with the agent. This adapter hands the runtime each listed object as ADDED, then LISTED with the keys that
exist, so the runtime drops what was deleted while the watch was broken; then the watch's events.
``metadata.managedFields`` is dropped in the thread, before the object reaches the loop.
"""

from __future__ import annotations

import logging
import typing as t

from kubernetes import client

from controllers.runtime import LISTED, Kind, Key, key_of, slim
from kubewatch.client import JsonClient
from kubewatch.listwatch import PAGE_SIZE, ListWatch

log = logging.getLogger(__name__)

Sink = t.Callable[[str, t.Any], None]
"""(event type: ADDED, MODIFIED, DELETED or LISTED; object), called on the event loop."""


def collection_path(kind: Kind) -> str:
    return f"/apis/{kind.group}/{kind.version}/{kind.plural}" if kind.group else f"/api/v1/{kind.plural}"


class KindLog(logging.LoggerAdapter):
    """The shared loop names the kind in ``extra``, which the controller's text log does not show: say it in the
    message too."""

    def process(self, msg: t.Any, kwargs: t.MutableMapping[str, t.Any]) -> tuple[t.Any, t.MutableMapping[str, t.Any]]:
        extra = kwargs.get("extra") or {}
        detail = f": {extra['error']}" if "error" in extra else ""
        return f"{msg} ({extra.get('kind')}{detail})", kwargs


class Informer(ListWatch):
    """List+watch of one kind in a thread; events reach ``sink`` on the event loop, in order."""

    def __init__(self, api_client: client.ApiClient, kind: Kind, sink: Sink, *, page_size: int = PAGE_SIZE) -> None:
        super().__init__(JsonClient(api_client), kind.plural, collection_path(kind),
                         {"labelSelector": kind.selector} if kind.selector else {}, page_size=page_size,
                         logger=KindLog(log, {}))
        self.kind = kind
        self.sink = sink
        self._keys: set[Key] = set()

    def _deliver(self, event_type: str, obj: t.Any) -> None:
        try:
            self.sink(event_type, obj)
        finally:
            if event_type == LISTED:
                self.synced.set()

    def _item(self, obj: dict, api_version: str | None = None) -> dict:
        slim(obj)
        if api_version:  # list items carry no apiVersion/kind
            obj.setdefault("apiVersion", api_version)
            obj.setdefault("kind", self.kind.kind)
        return obj

    def list_page(self, answer: dict[str, t.Any], first: bool) -> None:
        if first:
            self._keys = set()
        api_version = answer.get("apiVersion") or self.kind.api_version
        for item in answer.get("items") or ():
            self._item(item, api_version)
            self._keys.add(key_of(self.kind.plural, item))
            self.post(self._deliver, "ADDED", item)

    def list_done(self) -> None:
        keys, self._keys = self._keys, set()
        self.post(self._deliver, LISTED, keys)

    def watch_event(self, event_type: str, obj: dict[str, t.Any]) -> None:
        self.post(self._deliver, event_type, self._item(obj))
