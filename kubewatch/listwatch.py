"""The list+watch loop of one Kubernetes collection, run in a thread; the base of the controller's informers
(controllers/informer.py: batched raw events and a LISTED marker for its store) and the agent's
(hostagent/kube.py: a cache and ``on_event(old, new)``).

A listing is paged (10,000 guests never sit in memory as one JSON answer), then the collection is watched from
the listing's resourceVersion, with bookmarks. A broken stream resumes from the last resourceVersion; an expired
one (410 Gone, as after an apiserver restart) is listed again. Failures back off with full jitter from 0.5 s to
30 s, logged once per kind of failure; a watch that ends at once, again and again, backs off too, so it never
becomes a hot loop. ``stop()`` shuts the open stream's socket down, so the thread ends at once, not after the
watch's timeout. What the loop finds reaches the subclass's hooks in the thread; :meth:`ListWatch.post` hands
work to the event loop in batches (one wake-up per batch, not per event), in order.

The transport is anything with ``list`` and ``watch`` (:class:`Transport`), e.g. :class:`kubewatch.client.JsonClient`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import threading
import time
import typing as t
from collections.abc import Callable, Iterator, Mapping

from kubewatch.client import KubeError

log = logging.getLogger(__name__)

PAGE_SIZE = 500
NUDGE_SPACING = 1.0
WATCH_EVENTS = ("ADDED", "MODIFIED", "DELETED")


class Expired(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


class Transport(t.Protocol):
    """The two requests of a list+watch; both raise :class:`KubeError` (status None: unreachable)."""

    def list(self, path: str, query: Mapping[str, t.Any], timeout: float) -> dict[str, t.Any]:
        """One page of the collection: the decoded List (``items``, ``metadata.continue``/``resourceVersion``)."""
        ...

    def watch(self, path: str, query: Mapping[str, t.Any], timeout_seconds: int,
              on_response: Callable[[t.Any], None]) -> Iterator[dict[str, t.Any]]:
        """The decoded events of one watch request; ``on_response`` gets the open response once connected (its
        ``connection.sock`` is shut down to stop a blocked read)."""
        ...


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


def shutdown(response: t.Any) -> None:
    """Unblock a thread reading ``response`` at once (see kubernetes.watch.Watch.stop)."""
    sock = getattr(getattr(response, "connection", None), "sock", None)
    if sock is not None:
        try:
            sock.shutdown(2)
        except OSError:
            pass


class ListWatch:
    """List+watch of the collection at ``path`` in a thread named ``watch-<name>``.

    Subclasses implement the hooks (called in the thread): :meth:`list_page`, :meth:`list_done`,
    :meth:`watch_event`, and optionally :meth:`connected` and :meth:`failed`.
    """

    healthy_seconds = 5.0
    """A watch that lasted this long was healthy: the backoff starts again from its initial delay."""

    def __init__(self, transport: Transport, name: str, path: str, query: Mapping[str, t.Any] | None = None, *,
                 page_size: int = PAGE_SIZE, logger: logging.Logger | logging.LoggerAdapter[t.Any] = log) -> None:
        self.transport = transport
        self.name = name
        self.path = path
        self.query: dict[str, t.Any] = dict(query or {})
        self.page_size = page_size
        self.log = logger
        self.backoff = Backoff()
        self.synced = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: collections.deque[tuple[Callable[..., None], tuple[t.Any, ...]]] = collections.deque()
        self._scheduled = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wakeup = threading.Event()  # ends a backoff early (stop, nudge)
        self._failing = False
        self._unavailable = False  # the last failure was an outage (unreachable, 429, 5xx)
        self._last_attempt = 0.0
        self._response: t.Any = None
        self._thread: threading.Thread | None = None

    # -- hooks (thread side) ----------------------------------------------------------------------

    def list_page(self, answer: dict[str, t.Any], first: bool) -> None:
        """One page of a listing; ``first`` starts a new listing (a failed one is started again)."""
        raise NotImplementedError

    def list_done(self) -> None:
        """The listing's last page was handed to :meth:`list_page`."""
        raise NotImplementedError

    def watch_event(self, event_type: str, obj: dict[str, t.Any]) -> None:
        """An ADDED, MODIFIED or DELETED event of the watch."""
        raise NotImplementedError

    def connected(self) -> None:
        """A listing was answered or a watch opened: the apiserver answers."""

    def failed(self, error: KubeError) -> None:
        """A list or watch failed (status None: the apiserver could not be reached)."""

    # -- event loop side --------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"watch-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wakeup.set()
        response = self._response
        if response is not None:
            shutdown(response)

    def nudge(self) -> None:
        """The apiserver answers again: retry now if the last failure was an outage (at most once a
        second). A refusal (403, 404) is not cured by the apiserver answering: it keeps its backoff."""
        if self._unavailable and time.monotonic() - self._last_attempt >= NUDGE_SPACING:
            self._wakeup.set()

    def _drain(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, collections.deque()
            self._scheduled = False
        for function, args in batch:
            try:
                function(*args)
            except Exception:  # one bad object must not stop the others
                self.log.exception("handling a watch event failed", extra={"kind": self.name})

    # -- thread side ------------------------------------------------------------------------------

    def post(self, function: Callable[..., None], *args: t.Any) -> None:
        """Call ``function(*args)`` on the event loop, after what was posted before."""
        assert self._loop is not None
        with self._lock:
            self._pending.append((function, args))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: the process is exiting
            self._stop.set()

    def _list(self) -> str:
        """Every page, then :meth:`list_done`; returns the listing's resourceVersion."""
        query: dict[str, t.Any] = {**self.query, "limit": self.page_size}
        first = True
        while True:
            answer = self.transport.list(self.path, query, 60)
            self.list_page(answer, first)
            first = False
            metadata = answer.get("metadata") or {}
            if not metadata.get("continue"):
                self.list_done()
                self._recovered()
                return str(metadata.get("resourceVersion", ""))
            query["continue"] = metadata["continue"]

    def _opened(self, response: t.Any) -> None:
        self._response = response
        if self._stop.is_set():  # stop() came before the response was known
            shutdown(response)
        self._recovered()

    def _watch(self, resource_version: str) -> str:
        """Follow one watch request until the server ends it; returns the resourceVersion to resume from."""
        timeout = random.randint(240, 360)  # spread the reconnects of many clients
        query = {**self.query, "resourceVersion": resource_version}
        try:
            for event in self.transport.watch(self.path, query, timeout, self._opened):
                if self._stop.is_set():
                    break
                event_type, obj = event.get("type"), event.get("object") or {}
                if event_type == "ERROR":
                    if obj.get("code") == 410:
                        raise Expired()
                    raise KubeError(obj.get("code"), str(obj.get("reason", "")), str(obj.get("message", "")))
                resource_version = (obj.get("metadata") or {}).get("resourceVersion") or resource_version
                if event_type in WATCH_EVENTS:
                    self.watch_event(event_type, obj)
        finally:
            self._response = None
        return resource_version

    def _recovered(self) -> None:
        self._unavailable = False
        if self._failing:
            self._failing = False
            self.log.info("list/watch recovered", extra={"kind": self.name})
        self.connected()

    def _run(self) -> None:
        backoff = self.backoff
        resource_version: str | None = None
        last_status: int | None | str = "none"
        while not self._stop.is_set():
            self._last_attempt = started = time.monotonic()
            try:
                if resource_version is None:
                    resource_version = self._list()
                resource_version = self._watch(resource_version)
                if time.monotonic() - started > self.healthy_seconds:
                    backoff.reset()
                    continue
                # A watch that ends at once, again and again, must not become a hot loop.
                delay = backoff.next()
            except Expired:
                self.log.info("watch expired; relisting", extra={"kind": self.name})
                resource_version = None
                continue
            except KubeError as error:
                if self._stop.is_set():
                    break  # stop() shut the stream down
                if error.status == 410:  # an expired continue token, or a watch refused outright
                    self.log.info("watch expired; relisting", extra={"kind": self.name})
                    resource_version = None
                    continue
                self.failed(error)
                if not self._failing or error.status != last_status:  # once per kind of failure
                    self.log.warning("list/watch failed; retrying with backoff",
                                     extra={"kind": self.name, "error": str(error)})
                self._failing, last_status, self._unavailable = True, error.status, error.unavailable
                if error.status in (403, 404):
                    resource_version = None  # CRD missing or forbidden: nothing to resume
                delay = backoff.next()
            except Exception:  # a bug must not end the watch for good
                self.log.exception("watch thread error", extra={"kind": self.name})
                resource_version, self._failing = None, True
                delay = backoff.next()
            self._wakeup.wait(delay)
            self._wakeup.clear()
