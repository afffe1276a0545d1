"""The usage meter: writes hourly UsageRecords (:mod:`controllers.usage`) for guests, volumes and public
IP addresses, and exports their totals as Prometheus metrics.

It is registered as the reconciler of UsageRecords (so the runtime primes and watches them), but its
work is driven by the metered kinds: a watch event that ends something (a run, the object) or changes
an amount marks the resource dirty (with the time the change was seen, the end of a run), a loop
meters the dirty ones every second, and every ``checkpoint_seconds`` (an hour, the records' period) it
meters everything still running or allocated, so open records close and a run that ends while no
controller runs is lost for at most that long (a standby replica takes over in seconds). Every 5
minutes (before) was one write per guest and per volume each time: 67 writes a second with 10,000
guests and their root disks, as many as 700 hosts' Leases. Creations and run starts wait for the checkpoint: the objects
keep their timestamps, so nothing is lost, and a burst of guests does not cost two record writes each
(benchmarks/api_writes.py); events that change nothing metering reads cost nothing.
"""

from __future__ import annotations

import asyncio
import logging
import typing as t

from controllers import kinds, metrics, usage
from controllers.api.v1alpha1.common import API_VERSION
from controllers.runtime import Reconciler, Result, utcnow

log = logging.getLogger(__name__)
GIB = 1024**3
METERED = {"virtualmachines": "VirtualMachine", "volumes": "Volume", "publicipaddresses": "PublicIPAddress"}


class UsageReconciler(Reconciler):
    kind = kinds.USAGERECORDS
    checkpoint_seconds = 3600.0
    tick_seconds = 1.0

    def setup(self) -> None:
        self.store.define_index("usagerecords", "uid", lambda r: [r.spec.resource_uid])
        self._dirty: dict[str, tuple[str, t.Any, t.Any]] = {}  # uid -> (plural, object, seen at)
        self._runs: dict[str, tuple[t.Any, t.Any]] = {}  # uid -> (run start, last seen running)
        self._seen: dict[str, tuple] = {}  # uid -> the facts metering last saw (see _facts)
        self._written: dict[tuple[str | None, str], dict] = {}
        self._task: asyncio.Task | None = None
        COLLECTOR.reconciler = self

    def watch_map(self):
        def touch(plural: str):
            def mapper(obj: t.Any) -> list:
                uid = obj.metadata.uid
                if not uid:
                    return []
                facts = self._facts(plural, obj)
                before = self._seen.get(uid)
                if before == facts:
                    return []  # a change metering does not see (most of a guest's status writes)
                self._seen[uid] = facts
                if facts[1] is not None:  # running: remember the run, whether or not it is written now
                    self._runs[uid] = (usage.parse_time(facts[1]), utcnow())
                # A new object or a run that begins is recomputed from the object's timestamps at any later
                # look (the next checkpoint, a restart); only what the objects do not keep must be written
                # now: an end (the time a run stopped is when it was seen), a deletion, a new size or offering.
                if before is not None and (before[0] != facts[0] or (before[1] is not None and before[1] != facts[1])
                                           or any(b is not None and b != f for b, f in zip(before[2:], facts[2:]))):
                    self._dirty[uid] = (plural, obj, utcnow())
                return []
            return mapper
        return {plural: touch(plural) for plural in METERED}

    @staticmethod
    def _facts(plural: str, obj: t.Any) -> tuple:
        """What metering reads from an object: (end, start of the current run, amounts). An amount that becomes
        known (a new volume's size) is no change; one that changes is."""
        meta = obj.metadata
        end = (str(meta.deletion_timestamp) if meta.deletion_timestamp else None,
               str(obj.status.destroyed_at) if plural == "virtualmachines" and obj.status.destroyed_at else None)
        if plural == "virtualmachines":
            node = obj.status.node
            start = str(node.started_at) if node is not None and node.domain_state == "running" and node.started_at \
                else None
            return end, start, obj.spec.service_offering
        if plural == "volumes":
            return end, None, obj.status.size_bytes or obj.spec.size_gib, obj.spec.disk_offering
        return end, None

    def primed(self) -> None:
        for record in self.store.list("usagerecords"):
            self._written[record.metadata.namespace, record.metadata.name] = record.status.model_dump(
                mode="json", by_alias=True, exclude_none=True, exclude={"conditions", "observed_generation"})
        for plural in METERED:
            for obj in self.store.list(plural):
                self._dirty[obj.metadata.uid] = (plural, obj, utcnow())
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="usage-meter")

    async def reconcile(self, obj: t.Any) -> Result:
        return Result()  # records are written by the meter loop

    # -- the loop ----------------------------------------------------------------------------------

    async def _loop(self) -> None:
        await self.runtime.started.wait()
        loop = asyncio.get_running_loop()
        next_checkpoint = loop.time() + self.checkpoint_seconds
        while True:
            await asyncio.sleep(self.tick_seconds)
            if loop.time() >= next_checkpoint:
                next_checkpoint = loop.time() + self.checkpoint_seconds
                for plural in METERED:
                    for obj in self.store.list(plural):
                        self._dirty.setdefault(obj.metadata.uid, (plural, obj, utcnow()))
            dirty, self._dirty = self._dirty, {}
            for uid, (plural, obj, seen) in dirty.items():
                current = self.store.get(plural, obj.metadata.name, obj.metadata.namespace)
                if current is not None and current.metadata.uid == uid:
                    obj = current
                else:
                    self._seen.pop(uid, None)  # gone: this is its last look
                try:
                    await self.meter(plural, obj, seen)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("metering %s %s/%s failed; retrying", plural, obj.metadata.namespace,
                                  obj.metadata.name)
                    self._dirty.setdefault(uid, (plural, obj, seen))

    def meter_of(self, plural: str, obj: t.Any, seen: t.Any, now: t.Any) -> usage.Meter:
        meta = obj.metadata
        created = usage.parse_time(meta.creation_timestamp) if meta.creation_timestamp else seen
        ended = meta.deletion_timestamp
        kind = METERED[plural]
        if plural == "virtualmachines":
            ended = obj.status.destroyed_at or ended
            node = obj.status.node
            run = None
            if node is not None and node.domain_state == "running" and node.started_at:
                start = usage.parse_time(node.started_at)
                self._runs[meta.uid] = (start, now)
                run = (start, now)
            elif meta.uid in self._runs:
                start, _ = self._runs.pop(meta.uid)
                run = (start, seen)  # it stopped: the run ends when the stop was seen
            return usage.Meter(kind, meta.name, meta.uid, created, usage.parse_time(ended) if ended else None,
                               offering=obj.spec.service_offering, run=run)
        size = None
        offering = None
        if plural == "volumes":
            size = (obj.status.size_bytes / GIB) if obj.status.size_bytes else float(obj.spec.size_gib or 0)
            offering = obj.spec.disk_offering
        return usage.Meter(kind, meta.name, meta.uid, created, usage.parse_time(ended) if ended else None,
                           offering=offering, size_gib=size)

    async def meter(self, plural: str, obj: t.Any, seen: t.Any) -> None:
        now = utcnow()
        meter = self.meter_of(plural, obj, seen, now)
        namespace = obj.metadata.namespace
        records = self.store.by("usagerecords", "uid", meter.uid)
        metered_until = max((r.status.metered_until for r in records if r.status.metered_until), default=None)
        for period in usage.due_periods(meter, metered_until, now):
            name = usage.record_name(meter, period)
            existing = self.store.get("usagerecords", name, namespace)
            previous_runs = [(usage.parse_time(i["start"]), usage.parse_time(i["end"]))
                             for i in self._written.get((namespace, name), {}).get("running", [])]
            if existing is not None and not previous_runs:
                previous_runs = [(i.start, i.end) for i in existing.status.running]
            status = usage.record_status(meter, period, now, previous_runs)
            if self._written.get((namespace, name)) == status:
                continue
            if existing is None and (namespace, name) not in self._written:
                await self.runtime.api.create(self.kind, {
                    "apiVersion": API_VERSION, "kind": "UsageRecord",
                    "metadata": {"name": name, "namespace": namespace,
                                 "labels": {"cumulo.io/usage-kind": meter.kind}},
                    "spec": usage.record_spec(meter, period)})
            await self.runtime.api.patch_status(self.kind, name, namespace, status)
            self._written[namespace, name] = status


class UsageCollector:
    """Totals of the usage records per namespace (and offering), computed at scrape time."""

    reconciler: UsageReconciler | None = None

    def collect(self) -> t.Iterator[t.Any]:
        from prometheus_client.core import CounterMetricFamily

        running = CounterMetricFamily("cumulo_usage_vm_running_hours", "Hours guests ran, by namespace and "
                                      "service offering (from UsageRecords).", labels=["namespace", "offering"])
        allocated = CounterMetricFamily("cumulo_usage_allocated_hours", "Hours resources were allocated, by "
                                        "namespace, kind and offering (from UsageRecords).",
                                        labels=["namespace", "kind", "offering"])
        gib = CounterMetricFamily("cumulo_usage_volume_gib_hours", "Volume GiB-hours, by namespace (from "
                                  "UsageRecords).", labels=["namespace"])
        totals: dict[tuple, float] = {}
        for _ in range(3):  # the store changes under a scrape now and then: try again
            try:
                records = list(self.reconciler.store.list("usagerecords")) if self.reconciler else []
                break
            except RuntimeError:
                continue
        else:
            records = []
        for record in records:
            namespace, status = record.metadata.namespace, record.status
            offering = status.offering or ""
            if status.running_hours:
                key = ("running", namespace, offering)
                totals[key] = totals.get(key, 0.0) + status.running_hours
            if status.allocated_hours:
                key = ("allocated", namespace, record.spec.kind.value, offering)
                totals[key] = totals.get(key, 0.0) + status.allocated_hours
            if status.gib_hours:
                key = ("gib", namespace)
                totals[key] = totals.get(key, 0.0) + status.gib_hours
        for key, value in sorted(totals.items()):
            {"running": running, "allocated": allocated, "gib": gib}[key[0]].add_metric(list(key[1:]), value)
        yield running
        yield allocated
        yield gib

    def describe(self) -> list:
        return []


COLLECTOR = UsageCollector()
metrics.register_collector(COLLECTOR)
