"""Pure helpers for status conditions (Kubernetes metav1.Condition semantics) and phases."""

from __future__ import annotations

import dataclasses
import datetime

from controllers.api.v1alpha1.common import Condition, ConditionStatus

READY = "Ready"
DELETION_BLOCKED = "DeletionBlocked"


@dataclasses.dataclass(frozen=True)
class Check:
    """The outcome of one aspect of a reconcile, before it becomes a condition."""

    ok: bool
    reason: str
    message: str = ""

    @classmethod
    def passed(cls, reason: str = "AsExpected", message: str = "") -> Check:
        return cls(True, reason, message)

    @classmethod
    def failed(cls, reason: str, message: str) -> Check:
        return cls(False, reason, message)


def find(conditions: list[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def is_true(conditions: list[Condition], type_: str) -> bool:
    found = find(conditions, type_)
    return found is not None and found.status == ConditionStatus.TRUE


def merge(
    previous: list[Condition], wanted: dict[str, Check | None], generation: int | None, now: datetime.datetime
) -> list[Condition]:
    """The new condition list: each wanted type set from its check (None removes it), others kept.

    lastTransitionTime only moves when the status flips, so an unchanged world yields an equal list
    and the reconciler writes nothing.
    """
    result = []
    for condition in previous:
        if condition.type not in wanted:
            result.append(condition)
    for type_, check in wanted.items():
        if check is None:
            continue
        status = ConditionStatus.TRUE if check.ok else ConditionStatus.FALSE
        old = find(previous, type_)
        transition = old.last_transition_time if old is not None and old.status == status else now
        result.append(
            Condition(
                type=type_, status=status, reason=check.reason, message=check.message,
                last_transition_time=transition, observed_generation=generation,
            )
        )
    order = {type_: index for index, type_ in enumerate(dict.fromkeys([READY, *sorted(wanted)]))}
    return sorted(result, key=lambda c: (order.get(c.type, len(order)), c.type))


def first_failure(*checks: Check) -> Check:
    """The first failed check, or a pass: what Ready reports when several things must hold."""
    return next((check for check in checks if not check.ok), Check.passed("Ready"))
