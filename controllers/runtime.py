"""A small reconcile runtime, in the shape of controller-runtime.

One list+watch per kind the controller cares about (controllers/informer.py) feeds one shared in-memory
:class:`Store` and enqueues keys on a de-duplicating :class:`WorkQueue`: the object's own key, and the keys other
kinds' reconcilers derive from it (a Host change enqueues its Cluster, a Cluster change its Hosts). Workers then
run one level-based ``reconcile()`` per key, never two at once for the same key.

The store is primed with every kind's listing before the workers start, so a reconcile never sees a half-filled
world (for example, a Zone whose HostPods were not listed yet looking deletable).

When a watch cannot resume (410 Gone, as after a kube-apiserver restart), the kind is listed again, and the
listing ends with the keys that exist (:data:`LISTED`): what the store has beyond them was deleted meanwhile and
is dropped (:meth:`Runtime.relisted`), or a deleted guest would block its network's deletion forever.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import dataclasses
import datetime
import functools
import logging
import sys
import time
import typing as t

import pydantic

from controllers import metrics
from controllers.api.v1alpha1.common import API_VERSION, FINALIZER, GROUP, VERSION, Resource

log = logging.getLogger(__name__)

Key = tuple[str, str | None, str]
"""(plural, namespace or None, name)."""

LISTED = "LISTED"
"""The event type closing a (re)listing of a kind; its object is the set of keys the listing returned."""


def key_of(plural: str, raw: t.Mapping[str, t.Any]) -> Key:
    meta = raw["metadata"]
    return plural, meta.get("namespace"), meta["name"]


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


# ---------------------------------------------------------------------------------------------
# Kinds
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Kind:
    """How to reach one resource type through the API and how to parse its objects."""

    plural: str
    group: str
    version: str
    namespaced: bool
    parse: t.Callable[[dict], t.Any]
    kind: str = ""
    selector: str | None = None
    """Server-side label selector for watching and listing, when only some objects matter."""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


def cumulo_kind(model: type[Resource]) -> Kind:
    meta = model._meta
    return Kind(meta.plural_name, GROUP, VERSION, meta.scope.value == "Namespaced", model.model_validate, meta.kind)


# ---------------------------------------------------------------------------------------------
# Store
# ---------------------------------------------------------------------------------------------


INTERN_MAX = 128
"""Strings up to this long are interned in stored objects (names, references, reasons repeat across thousands)."""


class Compactor:
    """Shrinks a freshly parsed pydantic object before the store keeps it, without changing what it holds.

    At 2,000 guests a stored VirtualMachine took ~14 KB, for ~1.6 KB of JSON: nearly half of it the per-instance
    ``__pydantic_fields_set__`` of its ~10 nested models (a set is 216-728 bytes), a quarter its strings, each a
    fresh copy per watch event. Both repeat across objects: equal field sets become one shared set, strings
    (up to :data:`INTERN_MAX`) interned ones. A shared set is never mutated through the copies reconcilers make
    (``model_copy`` copies it) and Cumulo never reads fields sets (no ``exclude_unset``)."""

    def __init__(self) -> None:
        self._sets: dict[frozenset[str], set[str]] = {}

    def __call__(self, obj: t.Any) -> t.Any:
        stack = [obj]
        sets = self._sets
        while stack:
            item = stack.pop()
            if isinstance(item, pydantic.BaseModel):
                frozen = frozenset(item.__pydantic_fields_set__)
                shared = sets.get(frozen)
                if shared is None:
                    shared = sets[frozen] = set(frozen)
                object.__setattr__(item, "__pydantic_fields_set__", shared)
                entries: t.Any = item.__dict__
                pairs: t.Iterable[tuple[t.Any, t.Any]] = entries.items()
            elif isinstance(item, list):
                entries, pairs = item, enumerate(item)
            elif isinstance(item, dict):
                entries, pairs = item, item.items()
            else:
                continue  # not a model (a test's plain object)
            for key, value in pairs:  # rewriting existing keys while iterating is safe: the size never changes
                if type(value) is str:
                    if len(value) <= INTERN_MAX:
                        entries[key] = sys.intern(value)
                elif isinstance(value, (pydantic.BaseModel, list, dict)):
                    stack.append(value)
        return obj


def slim(raw: dict) -> dict:
    """Drop what no reconciler reads before parsing: ``metadata.managedFields`` (about half of an object's JSON)
    and the last-applied annotation of ``kubectl apply`` (a copy of the whole spec)."""
    meta = raw.get("metadata")
    if meta:
        meta.pop("managedFields", None)
        annotations = meta.get("annotations")
        if annotations:
            annotations.pop("kubectl.kubernetes.io/last-applied-configuration", None)
    return raw


class Store:
    """Parsed objects of every watched kind, with secondary indexes; the controller's view of the world.

    Objects are slimmed (:func:`slim`) before parsing and compacted (:class:`Compactor`) after: at 10,000
    guests the store is most of the controller's memory."""

    def __init__(self, kinds: t.Iterable[Kind]):
        self.kinds = {kind.plural: kind for kind in kinds}
        self._objects: dict[str, dict[tuple[str | None, str], t.Any]] = {plural: {} for plural in self.kinds}
        self._raw_versions: dict[Key, str] = {}
        self._stamps: dict[Key, int] = {}  # key -> value of `sequence` when it was last stored
        self.sequence = 0
        self._changes: collections.Counter[str] = collections.Counter()
        self._indexers: dict[tuple[str, str], t.Callable[[t.Any], t.Iterable[str]]] = {}
        self._indexes: dict[tuple[str, str], dict[str, set[tuple[str | None, str]]]] = {}
        self._sorted: dict[tuple[str, str, str], list[tuple[str | None, str]]] = {}
        self._compact = Compactor()

    def define_index(self, plural: str, name: str, values: t.Callable[[t.Any], t.Iterable[str]]) -> None:
        self._indexers[plural, name] = values
        self._sorted = {key: keys for key, keys in self._sorted.items() if key[:2] != (plural, name)}
        index: dict[str, set] = collections.defaultdict(set)
        for object_key, obj in self._objects[plural].items():
            for value in values(obj):
                index[value].add(object_key)
        self._indexes[plural, name] = index

    def upsert(self, plural: str, raw: dict) -> tuple[t.Any | None, t.Any]:
        """Store a new version of an object; return (previous parsed object or None, new one)."""
        key = key_of(plural, raw)
        object_key = key[1:]
        old = self._objects[plural].get(object_key)
        version = raw["metadata"].get("resourceVersion", "")
        if old is not None and self._raw_versions.get(key) == version:
            return old, old
        new = self._compact(self.kinds[plural].parse(slim(raw)))
        self._changes[plural] += 1
        self._objects[plural][object_key] = new
        self._raw_versions[key] = version
        self.sequence += 1
        self._stamps[key] = self.sequence
        self._reindex(plural, object_key, old, new)
        return old, new

    def remove(self, plural: str, raw: dict) -> t.Any | None:
        key = key_of(plural, raw)
        old = self._objects[plural].pop(key[1:], None)
        self._raw_versions.pop(key, None)
        self._stamps.pop(key, None)
        self._changes[plural] += 1
        if old is not None:
            self._reindex(plural, key[1:], old, None)
        return old

    def _reindex(self, plural: str, object_key, old, new) -> None:
        """Move ``object_key`` between index values; most updates (a status write) change none, and keep the
        sorted answers :meth:`by` cached. A value left with no objects is dropped (per-object values such as a
        guest's key would otherwise pile up as empty sets)."""
        for (indexed_plural, name), values in self._indexers.items():
            if indexed_plural != plural:
                continue
            before = set(values(old)) if old is not None else set()
            after = set(values(new)) if new is not None else set()
            if before == after:
                continue
            index = self._indexes[plural, name]
            for value in before - after:
                members = index.get(value)
                if members is not None:
                    members.discard(object_key)
                    if not members:
                        del index[value]
                self._sorted.pop((plural, name, value), None)
            for value in after - before:
                index[value].add(object_key)
                self._sorted.pop((plural, name, value), None)

    def stored_since(self, key: Key, sequence: int) -> bool:
        """Whether the object was stored (created or changed) after ``sequence`` was read."""
        return self._stamps.get(key, 0) > sequence

    def changes(self, plural: str) -> int:
        """A counter that moves whenever an object of ``plural`` changes (for caches derived from them)."""
        return self._changes[plural]

    def get(self, plural: str, name: str | None, namespace: str | None = None) -> t.Any | None:
        if name is None:
            return None
        return self._objects[plural].get((namespace, name))

    def list(self, plural: str) -> list[t.Any]:
        return list(self._objects[plural].values())

    def by(self, plural: str, index: str, value: str | None) -> list[t.Any]:
        """The objects whose ``index`` has ``value``, in key order (the order is cached until one joins or
        leaves: sorting a zone's 1,000 hosts took ~2 ms per call)."""
        if value is None:
            return []
        keys = self._sorted.get((plural, index, value))
        if keys is None:
            members = self._indexes[plural, index].get(value)
            if not members:
                return []
            keys = self._sorted[plural, index, value] = sorted(members, key=str)
        objects = self._objects[plural]
        return [objects[k] for k in keys if k in objects]

    def size(self, plural: str) -> int:
        """How many objects of ``plural`` are stored."""
        return len(self._objects[plural])

    def count(self, plural: str, index: str, value: str | None) -> int:
        """How many objects ``by`` would return, without building the list."""
        return len(self._indexes[plural, index].get(value, ())) if value is not None else 0


# ---------------------------------------------------------------------------------------------
# Work queue
# ---------------------------------------------------------------------------------------------


NEW_LANE_SHARE = 4
"""While changes of objects under way keep the workers busy, one take in this many still goes to a new object."""


class WorkQueue:
    """Keys waiting to be reconciled. A key is queued at most once and never processed twice at the
    same time; one added while it is being processed is processed again afterwards.

    Two lanes, each first in first out: keys of objects seen for the first time (``new``) wait behind changes
    of objects already under way (and of their dependents), so the next step of a guest being started (its
    root disk's target, its Running) is not queued behind thousands of guests created after it; one take in
    :data:`NEW_LANE_SHARE` still serves the new lane, so creations never starve."""

    def __init__(self) -> None:
        self._lanes: tuple[collections.deque[Key], collections.deque[Key]] = (collections.deque(),
                                                                               collections.deque())
        self._ready = asyncio.Event()
        self._takes = 0
        self._queued: set[Key] = set()
        self._active: set[Key] = set()
        self._dirty: set[Key] = set()
        self._timers: dict[Key, asyncio.TimerHandle] = {}

    def add(self, key: Key, new: bool = False) -> None:
        """Queue ``key``; ``new``: its object was just seen for the first time."""
        if key in self._active:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._lanes[1 if new else 0].append(key)
            self._ready.set()

    def add_after(self, key: Key, delay: float) -> None:
        """Queue ``key`` after ``delay`` seconds; an earlier pending request wins."""
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        timer = self._timers.get(key)
        if timer is not None and not timer.cancelled():
            if timer.when() <= due:
                return
            timer.cancel()
        self._timers[key] = loop.call_at(due, self._fire, key)

    def _fire(self, key: Key) -> None:
        self._timers.pop(key, None)
        self.add(key)

    async def get(self) -> Key:
        under_way, new = self._lanes
        while not (under_way or new):
            self._ready.clear()
            await self._ready.wait()
        self._takes += 1
        lane = new if new and (not under_way or self._takes % NEW_LANE_SHARE == 0) else under_way
        key = lane.popleft()
        self._queued.discard(key)
        self._active.add(key)
        return key

    def done(self, key: Key) -> None:
        self._active.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def __len__(self) -> int:
        return len(self._queued)


# ---------------------------------------------------------------------------------------------
# Reconcilers
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Result:
    requeue_after: float | None = None
    """Reconcile again after this many seconds even without events (time-based transitions, polling)."""


Mapper = t.Callable[[t.Any], t.Iterable[Key]]


class Reconciler(abc.ABC):
    """One per kind; see ``watch_map`` for how other kinds' changes reach it."""

    kind: Kind
    coalesced: t.ClassVar[frozenset[str]] = frozenset()
    """Kinds whose changes reach this reconciler at most once per ``Runtime.coalesce_seconds``: rollups (a Host's
    allocated capacity, an offering's user count) that would otherwise be rewritten on every guest's step."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    @property
    def store(self) -> Store:
        return self.runtime.store

    def key(self, name: str, namespace: str | None = None) -> Key:
        return self.kind.plural, namespace, name

    def setup(self) -> None:
        """Define the store indexes this reconciler needs."""

    def watch_map(self) -> dict[str, Mapper]:
        """Other kinds whose changes matter here: plural -> function giving the keys of ours to reconcile."""
        return {}

    def primed(self) -> None:
        """Called once the store holds every object, before the first reconcile (rebuild in-memory state)."""

    def forget(self, key: Key) -> None:
        """The object is gone from the API; drop in-memory state about it."""

    @abc.abstractmethod
    async def reconcile(self, obj: t.Any) -> Result:
        """Compare the world with ``obj``'s spec, take the next step, record it in status."""


# ---------------------------------------------------------------------------------------------
# Runtime
# ---------------------------------------------------------------------------------------------


class Runtime:
    """Ties the store, the queue, the API and the reconcilers together."""

    def __init__(self, api: t.Any, kinds: t.Iterable[Kind], reconcilers: t.Iterable[type[Reconciler]],
                 workers: int = 4, events: t.Any = None, coalesce_seconds: float = 0.0):
        self.api = api
        self.coalesce_seconds = coalesce_seconds
        self.events = events
        self.store = Store(kinds)
        self.queue = WorkQueue()
        self.reconcilers: dict[str, Reconciler] = {}
        self.watchers: dict[str, list[tuple[Reconciler, Mapper]]] = collections.defaultdict(list)
        for reconciler_class in reconcilers:
            reconciler = reconciler_class(self)
            self.reconcilers[reconciler.kind.plural] = reconciler
        for reconciler in self.reconcilers.values():
            reconciler.setup()
            for plural, mapper in reconciler.watch_map().items():
                self.watchers[plural].append((reconciler, mapper))
        self.worker_count = workers
        self._backoff: dict[Key, float] = {}
        self._tasks: list[asyncio.Task] = []
        self.started = asyncio.Event()
        self.reconciles = 0
        self.loaded = False
        self.informers: list[t.Any] = []

    def watch(self, informer: t.Callable[[Kind, t.Callable[[str, t.Any], None]], t.Any]) -> None:
        """Start one list+watch per kind: ``informer(kind, sink)`` (controllers/informer.py) gives an object with
        ``start()``, ``stop()`` and a ``synced`` event; :meth:`load` then waits for their first listings."""
        for kind in self.store.kinds.values():
            self.informers.append(informer(kind, functools.partial(self.watched, kind.plural)))
        for started in self.informers:
            started.start()

    def watched(self, plural: str, event_type: str, obj: t.Any) -> None:
        """One event of a kind's list+watch: an object's change, or the end of a listing."""
        if event_type == LISTED:
            self.relisted(plural, obj)
        else:
            self.observe(plural, event_type, obj)

    async def load(self) -> None:
        """Fill the store with every kind: wait for the watches' first listings, or (without watches) LIST each
        kind. A standby controller loads at start-up and primes only once it leads (controllers/leader.py)."""
        if self.informers:
            for informer in self.informers:
                await informer.synced.wait()
        else:
            for kind in self.store.kinds.values():
                for raw in await self.api.list(kind):
                    self.store.upsert(kind.plural, raw)
        self.loaded = True

    async def prime(self) -> None:
        """Load the store unless loaded, rebuild the reconcilers' state from it and queue every object."""
        if not self.loaded:
            await self.load()
        for reconciler in self.reconcilers.values():
            reconciler.primed()
            for obj in self.store.list(reconciler.kind.plural):
                self.queue.add(reconciler.key(obj.metadata.name, obj.metadata.namespace))

    async def start(self) -> None:
        await self.prime()
        self._tasks = [asyncio.create_task(self._work(), name=f"reconcile-worker-{i}")
                       for i in range(self.worker_count)]
        self.started.set()

    async def stop(self) -> None:
        for informer in self.informers:
            informer.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def observe(self, plural: str, event_type: str | None, raw: dict) -> None:
        """Feed one watch event into the store and queue."""
        if event_type == "DELETED":
            old, new = self.store.remove(plural, raw), None
        else:
            old, new = self.store.upsert(plural, raw)
            if old is new:
                return  # a resync of a version we already have
        if plural in self.reconcilers:
            # New work is an object seen for the first time that nothing owns (a dependent, such as a guest's root
            # Volume, is part of its owner's progress).
            fresh = old is None and new is not None and not raw.get("metadata", {}).get("ownerReferences")
            self.queue.add(key_of(plural, raw), new=fresh)
        for reconciler, mapper in self.watchers.get(plural, ()):
            keys = set()
            for version in (old, new):
                if version is not None:
                    keys.update(mapper(version))
            delay = self.coalesce_seconds if plural in reconciler.coalesced else 0.0
            for key in keys:
                self.queue.add_after(key, delay)

    def relisted(self, plural: str, present: t.Collection[Key]) -> int:
        """A listing of ``plural`` ended with the keys in ``present``: drop (as if a DELETED event came) whatever
        the store has beyond them. The listing's objects and any watch event before it reached the store in order,
        so nothing newer can be missing from it. Returns how many were dropped."""
        gone = []
        for obj in self.store.list(plural):
            raw = {"metadata": {"name": obj.metadata.name, "namespace": obj.metadata.namespace}}
            if key_of(plural, raw) not in present:
                gone.append(raw)
        for raw in gone:
            log.info("%s %s/%s is gone (deleted while the watch was broken)", plural,
                     raw["metadata"]["namespace"], raw["metadata"]["name"])
            self.observe(plural, "DELETED", raw)
        return len(gone)

    async def _work(self) -> None:
        while True:
            key = await self.queue.get()
            try:
                await self._reconcile(key)
            finally:
                self.queue.done(key)

    async def _reconcile(self, key: Key) -> None:
        plural, namespace, name = key
        reconciler = self.reconcilers[plural]
        obj = self.store.get(plural, name, namespace)
        if obj is None:
            reconciler.forget(key)
            return
        started = time.monotonic()
        try:
            result = await metrics.timed_reconcile(reconciler.kind.kind or plural, reconciler.reconcile(obj))
        except Conflict as error:
            # Someone changed the object under us; its watch event brings the new version.
            log.debug("conflict reconciling %s: %s", key, error)
            self.queue.add_after(key, 0.5)
            return
        except Exception:
            delay = min(self._backoff.get(key, 0.5) * 2, 60.0)
            self._backoff[key] = delay
            log.exception("reconciling %s/%s failed; retrying in %.0fs", plural, name, delay)
            self.queue.add_after(key, delay)
            return
        self.reconciles += 1
        self._backoff.pop(key, None)
        log.debug("reconciled %s in %.1f ms", key, (time.monotonic() - started) * 1000)
        if result.requeue_after is not None:
            self.queue.add_after(key, result.requeue_after)


class Conflict(Exception):
    """The API refused a write because the object changed (HTTP 409, or a failed JSON-patch test)."""


# ---------------------------------------------------------------------------------------------
# Status and finalizer writes
# ---------------------------------------------------------------------------------------------


def merge_patch(old: t.Any, new: t.Any) -> t.Any:
    """The RFC 7386 merge patch turning ``old`` into ``new`` (None when they are equal)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return None if old == new else new
    patch: dict[str, t.Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        else:
            sub = merge_patch(old[key], value)
            if sub is not None and sub != {}:
                patch[key] = sub
    return patch or None


def status_patch(obj: Resource, status: t.Any, agent_keys: t.Collection[str] = ()) -> dict | None:
    """The merge patch of ``status`` that turns the object's current status into ``status``, leaving
    fields another writer owns (``agent_keys``) alone; None when nothing changes."""
    exclude = set(agent_keys)
    current = obj.status.model_dump(mode="json", by_alias=True, exclude_none=True, exclude=exclude)
    wanted = status.model_dump(mode="json", by_alias=True, exclude_none=True, exclude=exclude)
    return merge_patch(current, wanted)


def api_version_kind(obj: Resource) -> tuple[str, str]:
    return API_VERSION, type(obj)._meta.kind


def has_finalizer(obj: Resource) -> bool:
    return FINALIZER in obj.metadata.finalizers


def deleting(obj: Resource) -> bool:
    return obj.metadata.deletion_timestamp is not None
