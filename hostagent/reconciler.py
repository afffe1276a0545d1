"""What the agent's object reconcilers (Templates, Volumes, VirtualMachines) share: a label-selected
informer of the objects bound to the agent's hosts, a :class:`~hostagent.workqueue.WorkQueue` fed by its
events and by a periodic resync, and the status report under the one status key the agent owns for the
kind (a JSON merge patch of the status subresource, sent only when the report differs from what the
object holds).
"""

from __future__ import annotations

import abc
import asyncio
import logging
import random
import time
import typing as t
from collections.abc import Sequence

from controllers.api.v1alpha1.common import GROUP, VERSION
from controllers.api.v1alpha1.host import HOST_LABEL

from .inventory import node_patch, prune
from .kube import MERGE_PATCH, Informer, KubeError, resource_path
from .workqueue import WorkQueue

if t.TYPE_CHECKING:
    from .agent import Agent, HostWorker

log = logging.getLogger(__name__)

MAX_SELECTOR_LENGTH = 8000
"""A set-based selector longer than this (thousands of simulated hosts) is replaced by ``cumulo.io/host``
(label present) and filtered here, so the URL stays reasonable."""

CACHE_LAG_SECONDS = 5.0
"""After a report, the watch may take a moment to deliver the updated object: the same report is not sent
again within this time just because the cache still shows the old one."""


def host_selector(hosts: Sequence[str]) -> str:
    """The label selector of the objects bound to ``hosts``."""
    if len(hosts) == 1:
        return f"{HOST_LABEL}={hosts[0]}"
    selector = f"{HOST_LABEL} in ({','.join(hosts)})"
    return selector if len(selector) <= MAX_SELECTOR_LENGTH else HOST_LABEL


def namespaced_path(plural: str, key: str, subresource: str | None = None) -> str:
    namespace, _, name = key.partition("/")
    return resource_path(GROUP, VERSION, plural, name, namespace=namespace, subresource=subresource)


class ObjectReconciler(abc.ABC):
    kind: t.ClassVar[str]
    plural: t.ClassVar[str]
    status_key: t.ClassVar[str]
    """The status key the agent owns for this kind (DESIGN.md §3, single writer)."""

    def __init__(self, agent: Agent, *, concurrency: int = 4, resync_seconds: float = 60.0) -> None:
        self.agent = agent
        self.hosts = frozenset(agent.config.hosts)
        self.resync_seconds = resync_seconds
        self.informer = Informer(agent.api.kube, self.kind, resource_path(GROUP, VERSION, self.plural), self._event,
                                 label_selector=host_selector(list(agent.config.hosts)), health=agent.api.health,
                                 namespaced=True)
        self.queue = WorkQueue(self.kind, self._handle, concurrency=concurrency)
        self._written: dict[str, tuple[str, t.Any, float]] = {}
        self._states: dict[tuple[str, str], str] = {}

    # -- helpers ---------------------------------------------------------------------------------

    def worker(self, host: str | None) -> HostWorker | None:
        return self.agent.workers.get(host) if host in self.hosts else None

    def bound_host(self, obj: t.Mapping[str, t.Any]) -> str | None:
        """The host label, if it names one of this agent's hosts."""
        host = ((obj.get("metadata") or {}).get("labels") or {}).get(HOST_LABEL)
        return host if host in self.hosts else None

    def transition(self, key: str, topic: str, state: str, level: int, message: str, **fields: t.Any) -> None:
        """Log a state change of one object once, not on every retry."""
        if self._states.get((key, topic)) != state:
            self._states[(key, topic)] = state
            logging.getLogger(type(self).__module__).log(level, message,
                                                         extra={"kind": self.kind, "object": key, **fields})

    def forget_states(self, key: str) -> None:
        for entry in [entry for entry in self._states if entry[0] == key]:
            del self._states[entry]

    # -- events and the queue ----------------------------------------------------------------------

    def _event(self, kind: str, old: dict[str, t.Any] | None, new: dict[str, t.Any] | None) -> None:
        obj = new or old
        if obj is None:
            return
        key = self.informer.key(obj)
        self.on_event(kind, key, old, new)
        self.queue.add(key)

    def on_event(self, kind: str, key: str, old: dict[str, t.Any] | None, new: dict[str, t.Any] | None) -> None:
        """Hook: an event about ``key`` (before it is queued)."""

    async def _handle(self, key: str) -> float | None:
        obj = self.informer.cache.get(key)
        if obj is not None and self.bound_host(obj) is None:
            obj = None  # a wide selector (many simulated hosts) lets others' objects in
        return await self.reconcile(key, obj)

    @abc.abstractmethod
    async def reconcile(self, key: str, obj: dict[str, t.Any] | None) -> float | None:
        """Converge ``key`` (``obj``: the cached object, None when it is not bound to this agent any more);
        returns when to look again (None: on the next event or resync)."""

    async def _resync(self) -> None:
        await self.informer.synced.wait()
        while True:
            await asyncio.sleep(self.resync_seconds * random.uniform(0.9, 1.1))
            for key in list(self.informer.cache):
                self.queue.add(key, random.uniform(0, min(self.resync_seconds / 2, 5.0)))

    async def run(self) -> None:
        await asyncio.gather(self.queue.run(), self._resync(), *self.background())

    def background(self) -> list[t.Coroutine[t.Any, t.Any, None]]:
        """Hook: more coroutines to run beside the queue (sweeps)."""
        return []

    async def sweep_loop(self, sweep: t.Callable[[], t.Awaitable[None]], *, seconds: float, wake: asyncio.Event,
                         swept: asyncio.Event, what: str) -> None:
        """Run ``sweep`` once the informer has listed everything, then every ``seconds`` or soon after ``wake``
        is set (one run for a burst of wakes). A failing run is logged; the next turn tries again."""
        await self.informer.synced.wait()
        while True:
            try:
                await sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                logging.getLogger(type(self).__module__).exception(f"{what} failed")
            swept.set()
            try:
                await asyncio.wait_for(wake.wait(), seconds)
                await asyncio.sleep(0.5)  # one sweep for a burst of events
            except TimeoutError:
                pass
            wake.clear()

    # -- status ----------------------------------------------------------------------------------

    async def report(self, key: str, obj: t.Mapping[str, t.Any], value: t.Mapping[str, t.Any] | None) -> bool:
        """Make ``status.<status_key>`` say ``value`` (None: remove it). One merge patch, only when the
        object says something else; whether a patch was sent. A 404 (the object went) is not an error."""
        current = prune((obj.get("status") or {}).get(self.status_key))
        wanted = prune(value) if value is not None else None
        if current == wanted or (current in (None, {}) and wanted is None):
            return False
        uid = str((obj.get("metadata") or {}).get("uid", ""))
        written = self._written.get(key)
        if written is not None and written[0] == uid and written[1] == wanted and \
                time.monotonic() - written[2] < CACHE_LAG_SECONDS:
            return False
        body = node_patch(current, wanted) if wanted is not None else None
        patch = {"status": {self.status_key: body}}
        try:
            await self.agent.api.request("PATCH", namespaced_path(self.plural, key, "status"), body=patch,
                                         content_type=MERGE_PATCH)
        except KubeError as error:
            if error.status == 404:
                return False
            raise
        self._written[key] = (uid, wanted, time.monotonic())
        return True

    def last_report(self, key: str, obj: t.Mapping[str, t.Any]) -> dict[str, t.Any] | None:
        """``status.<status_key>`` as this agent last wrote it, if the cache may not show it yet; else the cache's."""
        uid = str((obj.get("metadata") or {}).get("uid", ""))
        written = self._written.get(key)
        if written is not None and written[0] == uid and time.monotonic() - written[2] < CACHE_LAG_SECONDS:
            return written[1]
        return (obj.get("status") or {}).get(self.status_key)

    async def get_live(self, key: str) -> dict[str, t.Any] | None:
        """The object from the API itself, not the cache (None: it does not exist). Raises KubeError when
        the API cannot answer: a caller deciding to destroy something must then do nothing."""
        try:
            obj: dict[str, t.Any] = await self.agent.api.request("GET", namespaced_path(self.plural, key))
        except KubeError as error:
            if error.status == 404:
                return None
            raise
        return obj
