"""Quota reconciler: keeps the quota ledger (:mod:`controllers.quota`) in step with the store and each
namespace's ``Quota.status.used`` with what the namespace holds.

The ledger is shared with the admission webhook (same process, same event loop): the webhook reserves
in it before a create reaches the API, the store confirms what was created. The VirtualMachine
reconciler asks :meth:`QuotaReconciler.admission` before placing a guest, so a guest that got past
the webhook (down, or created before the Quota) but does not fit waits, marked ``QuotaExceeded``, and
is placed once room appears. Other kinds are refused at admission and counted here; only guests (and
with them their root disks) are held back by the controller, since they are what takes capacity.
"""

from __future__ import annotations

import time
import typing as t

from controllers import admission, inventory, kinds, quota
from controllers.api.v1alpha1.quota import QuotaAmounts, QuotaStatus
from controllers.conditions import Check
from controllers.reconcilers.base import InventoryReconciler
from controllers.runtime import Key

QUOTA_NAME = "default"


def order_of(obj: t.Any) -> tuple[str, str]:
    created = obj.metadata.creation_timestamp
    return (created.isoformat() if created else "", obj.metadata.uid or "")


class QuotaReconciler(InventoryReconciler):
    kind = kinds.QUOTAS

    def setup(self) -> None:
        super().setup()
        self.ledger = quota.QuotaLedger()
        self._synced: dict[str, tuple] = {}
        for plural in admission.CHARGED:
            self.index(plural, "namespace", lambda obj: [obj.metadata.namespace])

    def watch_map(self):
        def of_namespace(obj):
            return [self.key(QUOTA_NAME, obj.metadata.namespace)]

        return {plural: of_namespace for plural in admission.CHARGED}

    def primed(self) -> None:
        for quota_object in self.store.list("quotas"):
            self.sync(quota_object.metadata.namespace)

    def forget(self, key: Key) -> None:
        self._synced.pop(key[1], None)
        self.ledger.forget(key[1])

    # -- the ledger -------------------------------------------------------------------------------

    def limits(self, namespace: str) -> dict[str, int | None] | None:
        """The namespace's limits by wire name (unset ones absent), or None when it has no Quota."""
        found = self.store.get("quotas", QUOTA_NAME, namespace)
        if found is None or found.metadata.deletion_timestamp is not None:
            return None
        return found.spec.limits.model_dump(by_alias=True, exclude_none=True)

    def sync(self, namespace: str, force: bool = False) -> list[Key]:
        """Bring the ledger in line with the store (only when something charged changed); queue the
        guests it admits."""
        version = (*(self.store.changes(p) for p in (*admission.CHARGED, "quotas", "serviceofferings", "templates")),)
        if not force and self._synced.get(namespace) == version:
            return []
        self._synced[namespace] = version
        limits = self.limits(namespace)
        if limits is None:
            self.ledger.forget(namespace)
            return []
        objects = [quota.Observed(admission.quota_key(plural, obj.metadata.name),
                                  admission.charge(self.store, plural, obj), order_of(obj),
                                  admission.holds(plural, obj))
                   for plural in admission.CHARGED for obj in self.store.by(plural, "namespace", namespace)]
        newly = self.ledger.sync(namespace, objects, limits, time.monotonic())
        keys = []
        for key in newly:
            kind, _, name = key.partition("/")
            if kind == "VirtualMachine":
                keys.append(("virtualmachines", namespace, name))
                self.runtime.queue.add(("virtualmachines", namespace, name))
        return keys

    def admission(self, plural: str, obj: t.Any) -> Check:
        """May this object go ahead (start, be placed)? Failed ``QuotaExceeded`` with the numbers if not."""
        namespace = obj.metadata.namespace
        self.sync(namespace)
        key = admission.quota_key(plural, obj.metadata.name)
        if self.ledger.admitted(namespace, key):
            return Check.passed()
        return Check.failed("QuotaExceeded", f"waiting for quota: {self.ledger.why_waiting(namespace, key)}")

    def admit(self, plural: str, obj: t.Any, old: t.Any | None, dry_run: bool) -> None:
        """The webhook's quota check (raises :class:`admission.Refused`)."""
        namespace = obj.metadata.namespace
        limits = self.limits(namespace)
        if limits is None:
            return
        self.sync(namespace)
        admission.check_quota(self.ledger, self.store, plural, obj, old, limits, time.monotonic(), dry_run)
        self._synced.pop(namespace, None)  # a reservation changed the ledger; the next sync re-reads the store

    # -- status -----------------------------------------------------------------------------------

    def derive(self, obj: t.Any, ctx: inventory.Context) -> QuotaStatus:
        namespace = obj.metadata.namespace
        self.sync(namespace, force=True)
        used = self.ledger.used(namespace)
        waiting = self.ledger.waiting(namespace)
        if ctx.deleting:
            ready = Check.passed("Deleting", "the namespace's limits are lifted")
        elif waiting:
            shown = ", ".join(waiting[:10]) + (f" and {len(waiting) - 10} more" if len(waiting) > 10 else "")
            ready = Check.failed("QuotaExceeded", f"waiting for quota: {shown} "
                                                  f"({self.ledger.why_waiting(namespace, waiting[0])})")
        else:
            over = quota.excess({}, used, self.ledger.limits(namespace))
            ready = Check.passed("WithinLimits") if not over else \
                Check.passed("OverLimit", "limits lowered below use (nothing new fits): " + "; ".join(over))
        return QuotaStatus(
            observed_generation=obj.metadata.generation, phase=inventory.phase(ctx, ready),
            used=QuotaAmounts.model_validate({r: used.get(r, 0) for r in quota.RESOURCES}),
            conditions=inventory.conditions(obj.status.conditions, obj.metadata.generation, ctx, ready))
