"""An in-memory stand-in for controllers.kubeapi.KubeApi: applies writes to a dict of raw objects and
feeds them back to the runtime, the way the apiserver's watch events would."""

from __future__ import annotations

import copy
import itertools
import typing as t

from controllers.runtime import Conflict, Kind, Runtime, merge_patch  # noqa: F401

_versions = itertools.count(1)


def _merge(target: dict, patch: dict) -> dict:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


class FakeApi:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str | None, str], dict] = {}
        self.calls: list[tuple[str, str, str]] = []
        self.runtime: Runtime | None = None

    def put(self, plural: str, raw: dict) -> dict:
        raw = copy.deepcopy(raw)
        meta = raw.setdefault("metadata", {})
        meta.setdefault("uid", f"uid-{meta['name']}")
        meta.setdefault("generation", 1)
        meta["resourceVersion"] = str(next(_versions))
        self.objects[plural, meta.get("namespace"), meta["name"]] = raw
        if self.runtime is not None:
            self.runtime.observe(plural, "MODIFIED", copy.deepcopy(raw))
        return raw

    def get(self, plural: str, name: str, namespace: str | None = None) -> dict | None:
        return self.objects.get((plural, namespace, name))

    async def list(self, kind: Kind) -> list[dict]:
        return [copy.deepcopy(o) for (plural, _, _), o in self.objects.items() if plural == kind.plural]

    async def list_selected(self, kind: Kind, field_selector: str) -> list[dict]:
        return []

    async def _update(self, kind: Kind, name: str, namespace: str | None, change: t.Callable[[dict], None]) -> None:
        raw = self.objects.get((kind.plural, namespace, name))
        if raw is None:
            return
        raw = copy.deepcopy(raw)
        change(raw)
        meta = raw["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            del self.objects[kind.plural, namespace, name]
            if self.runtime is not None:
                self.runtime.observe(kind.plural, "DELETED", raw)
            return
        self.put(kind.plural, raw)

    async def patch_status(self, kind: Kind, name: str, namespace: str | None, patch: dict) -> None:
        self.calls.append(("patch_status", kind.plural, name))
        await self._update(kind, name, namespace, lambda raw: _merge(raw.setdefault("status", {}), patch))

    async def set_finalizers(self, kind: Kind, name: str, namespace: str | None, resource_version: str,
                             wanted: list[str], labels: dict[str, str] | None = None) -> None:
        self.calls.append(("set_finalizers", kind.plural, name))
        current = self.objects.get((kind.plural, namespace, name))
        if current is not None and current["metadata"]["resourceVersion"] != resource_version:
            raise Conflict("stale")

        def update(raw: dict) -> None:
            raw["metadata"]["finalizers"] = wanted
            _merge(raw["metadata"].setdefault("labels", {}), labels or {})
        await self._update(kind, name, namespace, update)

    async def set_label(self, kind: Kind, name: str, namespace: str | None, key: str, value: str | None) -> None:
        self.calls.append(("set_label", kind.plural, name))
        await self._update(kind, name, namespace, lambda raw: _merge(raw["metadata"].setdefault("labels", {}),
                                                                     {key: value}))

    async def patch(self, kind: Kind, name: str, namespace: str | None, body: dict) -> None:
        self.calls.append(("patch", kind.plural, name))
        await self._update(kind, name, namespace, lambda raw: _merge(raw, body))

    async def create(self, kind: Kind, body: dict) -> dict | None:
        self.calls.append(("create", kind.plural, body["metadata"]["name"]))
        if (kind.plural, body["metadata"].get("namespace"), body["metadata"]["name"]) not in self.objects:
            return copy.deepcopy(self.put(kind.plural, body))
        return None

    async def delete(self, kind: Kind, name: str, namespace: str | None) -> None:
        self.calls.append(("delete", kind.plural, name))
        await self._update(kind, name, namespace,
                           lambda raw: raw["metadata"].__setitem__("deletionTimestamp", "2026-01-01T00:00:00Z"))

    async def record_event(self, kind: Kind, obj: t.Any, type_: str, reason: str, note: str) -> None:
        self.calls.append(("event", reason, note))
