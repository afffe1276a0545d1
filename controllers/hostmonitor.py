"""The host monitor: a host's connection state from its agent's heartbeat Lease (pure logic).

Like Kubernetes' node lifecycle controller, it trusts its own clock, not the agent's: a renewal counts
from the moment the controller sees the Lease's renewTime change, so clock skew between a host and
the controller cannot make a host look alive or dead. After a controller restart every host gets a
full lease duration of grace from the first time its Lease is seen.
"""

from __future__ import annotations

import dataclasses
import typing as t

from controllers.api.v1alpha1.host import HostState
from controllers.conditions import Check


@dataclasses.dataclass(frozen=True)
class Lease:
    """The parts of a coordination.k8s.io/v1 Lease the monitor reads."""

    name: str
    namespace: str
    host: str | None
    renew_time: str | None
    duration_seconds: int

    @property
    def metadata(self) -> t.Any:  # the store and runtime address objects by metadata
        return self

    @classmethod
    def parse(cls, raw: dict, host_label: str) -> Lease:
        meta, spec = raw["metadata"], raw.get("spec") or {}
        return cls(meta["name"], meta.get("namespace", ""), (meta.get("labels") or {}).get(host_label),
                   spec.get("renewTime"), int(spec.get("leaseDurationSeconds") or 40))


@dataclasses.dataclass
class Observation:
    renew_time: str | None
    seen_at: float
    """The controller's monotonic clock when this renewTime was first seen."""


class HostMonitor:
    """Remembers when each host's lease renewal was last seen."""

    def __init__(self, alert_after_seconds: float = 300.0):
        self.alert_after = alert_after_seconds
        self._seen: dict[str, Observation] = {}
        self._first: dict[str, str | None] = {}

    def observe(self, host: str, lease: Lease, now: float) -> None:
        self._first.setdefault(host, lease.renew_time)
        seen = self._seen.get(host)
        if seen is None or seen.renew_time != lease.renew_time:
            self._seen[host] = Observation(lease.renew_time, now)

    def forget(self, host: str) -> None:
        self._seen.pop(host, None)
        self._first.pop(host, None)

    def first_renew_time(self, host: str) -> str | None:
        """The renewTime of the host's Lease when this process first saw it."""
        return self._first.get(host)

    def last_seen(self, host: str) -> Observation | None:
        return self._seen.get(host)


def connection_state(seen: Observation | None, lease: Lease | None, reported: bool, now: float,
                     alert_after: float) -> tuple[HostState, Check, float | None]:
    """(state, Heartbeat check, seconds until the state may change by time alone)."""
    if lease is None or seen is None:
        return HostState.CONNECTING, Check.failed(
            "NoHeartbeat", "no heartbeat Lease from the host's agent yet; is cumulo-agent running there?"), None
    duration = lease.duration_seconds
    age = now - seen.seen_at
    if age <= duration:
        state = HostState.UP if reported else HostState.CONNECTING
        return state, Check.passed("LeaseRenewed", f"the agent renews its heartbeat within {duration}s"), \
            duration - age + 0.1
    if age <= duration + alert_after:
        return HostState.DISCONNECTED, Check.failed(
            "HeartbeatLost", f"the agent has not renewed its heartbeat for more than {duration}s"), \
            duration + alert_after - age + 0.1
    return HostState.ALERT, Check.failed(
        "HeartbeatLostLong", f"the agent has not renewed its heartbeat for more than {duration + alert_after:.0f}s; "
        "the host needs attention"), None
