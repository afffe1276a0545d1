"""What every infrastructure reconciler does: finalizer, dependents that block deletion, status, events."""

from __future__ import annotations

import abc
import dataclasses
import functools
import logging
import typing as t

from controllers.api.v1alpha1.common import FINALIZER, Resource
from controllers.conditions import READY, find
from controllers.inventory import Context
from controllers.runtime import Key, Reconciler, Result, deleting, status_patch, utcnow

log = logging.getLogger(__name__)

# A deletion blocked by dependents is re-checked on their events; this is only the safety net.
BLOCKED_RECHECK_SECONDS = 60.0


@functools.cache
def _attribute(model: type, segment: str) -> str:
    """The Python name of the field whose wire name is ``segment`` (cached: indexes call this per stored object)."""
    fields = getattr(model, "model_fields", {})
    return next((name for name, field in fields.items() if (field.alias or name) == segment), segment)


@functools.cache
def _segments(path: str) -> tuple[str, ...]:
    return tuple(path.strip(".").split("."))


def get_path(obj: t.Any, path: str) -> t.Any:
    """The value at a JSON path like ``.spec.zone`` (wire names) on a parsed object, or None."""
    value = obj
    for segment in _segments(path):
        if value is None:
            return None
        value = getattr(value, _attribute(type(value), segment), None)
    return value


@dataclasses.dataclass(frozen=True)
class Dependents:
    """Objects of ``plural`` that point at the reconciled object through ``path`` (a selectable field, so
    the API can confirm the store's answer before a deletion completes), or through ``values`` when the
    reference is not a selectable scalar."""

    plural: str
    path: str
    values: t.Callable[[t.Any], t.Iterable[str]] | None = None

    @property
    def index(self) -> str:
        return self.path

    def indexer(self) -> t.Callable[[t.Any], t.Iterable[str]]:
        if self.values is not None:
            return self.values
        path = self.path
        return lambda obj: [value] if (value := get_path(obj, path)) is not None else []


class InventoryReconciler(Reconciler, abc.ABC):
    """Reconcile = finalizer + dependents check + ``derive()`` (pure) + status patch + events."""

    dependents: t.ClassVar[tuple[Dependents, ...]] = ()
    agent_status_keys: t.ClassVar[tuple[str, ...]] = ()
    """Status keys another writer (the host agent) owns; never patched here."""
    progress_reasons: t.ClassVar[frozenset[str]] = frozenset()
    """Ready reasons that are steps of a normal transition: announced only with a change from one phase to another,
    not within a phase nor on the first status (an Event is a write; a burst of guests should not pay one per step)."""
    quiet_ready_phases: t.ClassVar[frozenset[str]] = frozenset()
    """Phases reached by normal progress without an Event (another object's Event says it: a root disk's Ready and
    Attached follow its guest's start); reaching them out of a failure is announced."""

    def setup(self) -> None:
        for dependent in self.dependents:
            self.store.define_index(dependent.plural, dependent.index, dependent.indexer())

    def index(self, plural: str, name: str, values: t.Callable[[t.Any], t.Iterable[str]]) -> None:
        self.store.define_index(plural, name, values)

    def watch_map(self) -> dict[str, t.Callable[[t.Any], t.Iterable[Key]]]:
        watches: dict[str, list[t.Callable[[t.Any], t.Iterable[Key]]]] = {}
        for dependent in self.dependents:
            watches.setdefault(dependent.plural, []).append(self._keys_via(dependent.indexer()))
        for plural, mapper in self.extra_watches().items():
            watches.setdefault(plural, []).append(mapper)
        return {plural: self._combine(mappers) for plural, mappers in watches.items()}

    def _keys_via(self, values: t.Callable[[t.Any], t.Iterable[str]]) -> t.Callable[[t.Any], t.Iterable[Key]]:
        return lambda obj: [self.key(value) for value in values(obj)]

    @staticmethod
    def _combine(mappers: list[t.Callable[[t.Any], t.Iterable[Key]]]) -> t.Callable[[t.Any], t.Iterable[Key]]:
        return lambda obj: [key for mapper in mappers for key in mapper(obj)]

    def extra_watches(self) -> dict[str, t.Callable[[t.Any], t.Iterable[Key]]]:
        """Kinds besides dependents whose changes alter this kind's status (children's capacity...)."""
        return {}

    def blocked_by(self, obj: Resource) -> list[str]:
        names = []
        for dependent in self.dependents:
            kind = self.store.kinds[dependent.plural].kind
            for other in self.store.by(dependent.plural, dependent.index, obj.metadata.name):
                namespace = f"{other.metadata.namespace}/" if other.metadata.namespace else ""
                names.append(f"{kind} {namespace}{other.metadata.name}")
        return names

    async def confirmed_free(self, obj: Resource) -> bool:
        """Ask the API itself, not the store, before letting a deletion through."""
        for dependent in self.dependents:
            if dependent.values is not None:
                continue  # not selectable; the primed store is the authority
            kind = self.store.kinds[dependent.plural]
            if await self.runtime.api.list_selected(kind, f"{dependent.path.strip('.')}={obj.metadata.name}"):
                return False
        return True

    @abc.abstractmethod
    def derive(self, obj: t.Any, ctx: Context) -> t.Any:
        """The status ``obj`` should have, from the store (pure apart from store reads)."""

    async def reconcile(self, obj: t.Any) -> Result:
        finalizers = list(obj.metadata.finalizers)
        blocked: list[str] = []
        if deleting(obj):
            blocked = self.blocked_by(obj)
            if not blocked and FINALIZER in finalizers and await self.finalize(obj) \
                    and await self.confirmed_free(obj):
                await self.runtime.api.set_finalizers(self.kind, obj.metadata.name, obj.metadata.namespace,
                                                      obj.metadata.resource_version,
                                                      [f for f in finalizers if f != FINALIZER])
                return Result()
        ctx = Context(now=utcnow(), blocked_by=tuple(blocked), deleting=deleting(obj))
        status = self.derive(obj, ctx)  # pure apart from in-memory reservations, which a retry derives again
        if not deleting(obj) and FINALIZER not in finalizers:
            # The finalizer goes on before anything is recorded or acted on; labels known by now go with it.
            labels = self.first_labels(obj, status)
            await self.runtime.api.set_finalizers(self.kind, obj.metadata.name, obj.metadata.namespace,
                                                  obj.metadata.resource_version, [*finalizers, FINALIZER], labels)
            if labels:
                meta = obj.metadata.model_copy(update={"labels": {**obj.metadata.labels, **labels}})
                obj = obj.model_copy(update={"metadata": meta})
        status = await self.prepare(obj, status, ctx)
        await self.write_status(obj, status)
        if not deleting(obj):
            await self.act(obj, status)
        return Result(BLOCKED_RECHECK_SECONDS) if blocked else self.requeue(obj)

    def first_labels(self, obj: t.Any, status: t.Any) -> dict[str, str]:
        """Labels to set in the same write as the finalizer (which ``act`` would otherwise set in another)."""
        return {}

    async def prepare(self, obj: t.Any, status: t.Any, ctx: Context) -> t.Any:
        """Child objects the status must name, created before it is written; the status to write."""
        return status

    async def finalize(self, obj: t.Any) -> bool:
        """Release what the object holds outside the API; True once nothing is left (then the finalizer
        goes). Called on each reconcile of a deleting object that no dependents hold."""
        return True

    async def act(self, obj: t.Any, status: t.Any) -> None:
        """Steps beyond status that follow from it (labels binding the object to a host, child objects)."""

    def requeue(self, obj: t.Any) -> Result:
        return Result()

    async def write_status(self, obj: Resource, status: t.Any) -> None:
        patch = status_patch(obj, status, self.agent_status_keys)
        if patch is None:
            return
        await self.runtime.api.patch_status(self.kind, obj.metadata.name, obj.metadata.namespace, patch)
        await self.announce(obj, status)

    async def announce(self, obj: Resource, status: t.Any) -> None:
        """An Event whenever the phase or the Ready reason changes."""
        old_ready, new_ready = find(obj.status.conditions, READY), find(status.conditions, READY)
        old = (obj.status.phase, old_ready.reason if old_ready else None)
        new = (status.phase, new_ready.reason if new_ready else None)
        if old == new or new_ready is None:
            return
        if new[1] in self.progress_reasons and (old[0] == new[0] or old[0] is None):
            return
        if new_ready.status.value == "True" and status.phase in self.quiet_ready_phases and (
                old_ready is None or old_ready.status.value == "True" or old_ready.reason in self.progress_reasons):
            return
        type_ = "Normal" if new_ready.status.value == "True" or status.phase == "Deleting" else "Warning"
        note = f"{status.phase}: {new_ready.message or new_ready.reason}"
        await self.runtime.api.record_event(self.kind, obj, type_, new_ready.reason, note)
