"""Leader election for cumulo-controller: one active replica, the others warm standbys.

Every replica runs kopf (its watches keep a standby's store current, and whatever kopf serves, such as
admission webhooks, is served by every replica), but only the holder of the ``coordination.k8s.io`` Lease
``cumulo-controller`` in ``cumulo-system`` runs reconciles: the Runtime's workers start when the Lease is
won, and the process stops reconciling and exits when it is lost, so a restart comes back as a clean standby.

Why a Lease and not kopf's peering: peering pauses operators of lower priority when it sees a peer, with no
fencing (two replicas starting together both run until they notice each other) and needs kopf's own CRDs;
a Lease is the mechanism Kubernetes' own controllers use, `kubectl get lease` shows who leads, and the
rules below make two leaders impossible as long as clocks advance at about the same rate.

The rules (client-go's leaderelection, restated):

- A candidate judges expiry by its *own* monotonic clock: a Lease held by someone else counts as expired
  only when its record (holder, renewTime, resourceVersion) has not changed for ``leaseDurationSeconds``
  since this candidate first saw it. Clock skew between machines never matters; a fresh candidate waits one
  full duration before it takes a Lease whose holder may still be alive.
- Every write carries the resourceVersion it was computed from, so two candidates racing for an expired
  Lease cannot both win: the second gets a 409 and looks again.
- The leader renews every ``retry_period``; if it has not renewed successfully for ``renew_deadline``
  (shorter than the duration), it steps down before anyone else may take over.
- A leader that stops cleanly releases the Lease (empty holder), so a standby takes over at once.

:func:`decide` and :func:`observe` are pure and unit-tested; :class:`LeaderElector` is the loop around them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import enum
import json
import logging
import os
import socket
import time
import typing as t
import uuid

log = logging.getLogger("cumulo.leader")

LEASE_NAME = "cumulo-controller"


def micro_time(now: datetime.datetime | None = None) -> str:
    now = now or datetime.datetime.now(datetime.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def default_identity() -> str:
    """The pod's name (the Deployment sets POD_NAME from the downward API), else host name and pid, plus a
    random suffix so a restarted process never mistakes its predecessor's Lease for its own."""
    base = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    return f"{base}_{uuid.uuid4().hex[:8]}"


# -- the pure part ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LeaseRecord:
    """The parts of the Lease the election reads."""

    holder: str | None
    duration_seconds: int
    acquire_time: str | None
    renew_time: str | None
    transitions: int
    resource_version: str

    @classmethod
    def parse(cls, raw: t.Mapping[str, t.Any]) -> LeaseRecord:
        spec = raw.get("spec") or {}
        return cls(spec.get("holderIdentity") or None, int(spec.get("leaseDurationSeconds") or 0),
                   spec.get("acquireTime"), spec.get("renewTime"), int(spec.get("leaseTransitions") or 0),
                   raw["metadata"].get("resourceVersion", ""))

    def fingerprint(self) -> tuple:
        return self.holder, self.renew_time, self.resource_version


@dataclasses.dataclass(frozen=True)
class Observation:
    record: LeaseRecord
    seen_at: float
    """This candidate's monotonic clock when the record (as fingerprinted) was first seen."""


def observe(previous: Observation | None, record: LeaseRecord | None, now: float) -> Observation | None:
    """Remember when a record was first seen: a changed record restarts its holder's time."""
    if record is None:
        return None
    if previous is not None and previous.record.fingerprint() == record.fingerprint():
        return Observation(record, previous.seen_at)
    return Observation(record, now)


class Action(enum.Enum):
    CREATE = "create"    # no Lease yet: create it, holding it
    ACQUIRE = "acquire"  # free or expired: take it over (a transition)
    RENEW = "renew"      # ours: renew it
    WAIT = "wait"        # someone else's and alive


@dataclasses.dataclass(frozen=True)
class Decision:
    action: Action
    wait_seconds: float = 0.0
    """For WAIT: how long, at least, until the holder's Lease may be expired."""


def decide(identity: str, observation: Observation | None, now: float, lease_duration: float) -> Decision:
    if observation is None:
        return Decision(Action.CREATE)
    record = observation.record
    if record.holder == identity:
        return Decision(Action.RENEW)
    if not record.holder:
        return Decision(Action.ACQUIRE)
    duration = record.duration_seconds or lease_duration
    remaining = observation.seen_at + duration - now
    if remaining <= 0:
        return Decision(Action.ACQUIRE)
    return Decision(Action.WAIT, remaining)


def lease_body(identity: str, decision: Action, record: LeaseRecord | None, lease_duration: float,
               now: datetime.datetime | None = None, *, release: bool = False) -> dict[str, t.Any]:
    """The spec to write for ``decision`` (or for a release: no holder, a 1 s duration)."""
    stamp = micro_time(now)
    if release:
        return {"holderIdentity": None, "leaseDurationSeconds": 1, "renewTime": stamp,
                "acquireTime": record.acquire_time if record else stamp,
                "leaseTransitions": record.transitions if record else 0}
    transitions = record.transitions if record else 0
    if decision is Action.RENEW and record is not None:
        acquire_time = record.acquire_time or stamp
    else:
        acquire_time = stamp
        if record is not None and record.holder != identity:
            transitions += 1
    return {"holderIdentity": identity, "leaseDurationSeconds": int(lease_duration), "acquireTime": acquire_time,
            "renewTime": stamp, "leaseTransitions": transitions}


def lost(last_renewed: float | None, now: float, renew_deadline: float) -> bool:
    """A leader that has not renewed for ``renew_deadline`` must stop before others may take over."""
    return last_renewed is None or now - last_renewed >= renew_deadline


# -- the loop -----------------------------------------------------------------------------------------------------


class LeaseConflict(Exception):
    """Someone else wrote the Lease between our read and our write (HTTP 409), or it vanished (404)."""


class LeaseApi(t.Protocol):
    async def read(self) -> dict | None: ...
    async def create(self, spec: dict) -> dict: ...
    async def replace(self, resource_version: str, spec: dict) -> dict: ...


class KubeLeaseApi:
    """The Lease through the blocking ``kubernetes`` client, one request per call, in a worker thread."""

    def __init__(self, api_client: t.Any, namespace: str, name: str = LEASE_NAME, timeout: float = 5.0):
        from kubernetes import client

        self.api = client.CoordinationV1Api(api_client)
        self.namespace, self.name, self.timeout = namespace, name, timeout

    async def _call(self, function: t.Callable[..., t.Any], *args: t.Any) -> dict | None:
        from kubernetes.client.rest import ApiException

        try:
            response = await asyncio.to_thread(function, *args, _preload_content=False,
                                               _request_timeout=self.timeout)
        except ApiException as error:
            if error.status in (404, 409):
                raise LeaseConflict(f"{error.status} {error.reason}") from error
            raise
        return json.loads(response.data)

    def _body(self, spec: dict, resource_version: str | None = None) -> dict:
        metadata: dict[str, t.Any] = {"name": self.name, "namespace": self.namespace,
                                      "labels": {"app.kubernetes.io/name": "cumulo",
                                                 "app.kubernetes.io/component": "controller"}}
        if resource_version:
            metadata["resourceVersion"] = resource_version
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata, "spec": spec}

    async def read(self) -> dict | None:
        try:
            return await self._call(self.api.read_namespaced_lease, self.name, self.namespace)
        except LeaseConflict:
            return None

    async def create(self, spec: dict) -> dict:
        return await self._call(self.api.create_namespaced_lease, self.namespace, self._body(spec))

    async def replace(self, resource_version: str, spec: dict) -> dict:
        return await self._call(self.api.replace_namespaced_lease, self.name, self.namespace,
                                self._body(spec, resource_version))


class LeaderElector:
    """Acquires, renews and releases the Lease; ``leading`` is set while this replica leads."""

    def __init__(self, api: LeaseApi, identity: str, *, lease_duration: float = 15.0, renew_deadline: float = 10.0,
                 retry_period: float = 2.0, clock: t.Callable[[], float] = time.monotonic):
        if not retry_period < renew_deadline < lease_duration:
            raise ValueError("leader election needs retry period < renew deadline < lease duration")
        self.api, self.identity, self.clock = api, identity, clock
        self.lease_duration, self.renew_deadline, self.retry_period = lease_duration, renew_deadline, retry_period
        self.leading = asyncio.Event()
        self.lost = asyncio.Event()
        self._observation: Observation | None = None
        self._last_renewed: float | None = None
        self._waiting_logged: str | None = None

    async def try_once(self) -> bool:
        """One round: read, decide, write. Whether we hold the Lease now."""
        raw = await self.api.read()
        now = self.clock()
        record = LeaseRecord.parse(raw) if raw is not None else None
        self._observation = observe(self._observation, record, now)
        decision = decide(self.identity, self._observation, now, self.lease_duration)
        if decision.action is Action.WAIT:
            holder = record.holder if record else None
            if self._waiting_logged != holder:
                self._waiting_logged = holder
                log.info("standing by: %s leads (lease %s)", holder, getattr(self.api, "name", LEASE_NAME))
            return False
        spec = lease_body(self.identity, decision.action, record, self.lease_duration)
        try:
            if decision.action is Action.CREATE:
                written = await self.api.create(spec)
            else:
                written = await self.api.replace(record.resource_version, spec)  # type: ignore[union-attr]
        except LeaseConflict as error:
            log.debug("lease write lost a race (%s); looking again", error)
            return False
        self._observation = observe(None, LeaseRecord.parse(written), self.clock())
        self._last_renewed = now
        if decision.action is not Action.RENEW:
            log.info("leading: acquired the lease as %s", self.identity)
        return True

    async def run(self) -> None:
        """Campaign until leading, then renew until the Lease is lost (sets ``lost`` and returns) or the task
        is cancelled (releases the Lease if held)."""
        try:
            while not self.leading.is_set():
                try:
                    if await self.try_once():
                        self.leading.set()
                        break
                except Exception as error:  # an apiserver outage: keep campaigning
                    log.warning("leader election: %s", error)
                await asyncio.sleep(self.retry_period)
            while True:
                await asyncio.sleep(self.retry_period)
                try:
                    renewed = await asyncio.wait_for(self.try_once(), timeout=self.renew_deadline)
                except Exception as error:
                    log.warning("lease renewal failed: %s", error)
                    renewed = False
                taken = self._observation is not None and self._observation.record.holder not in (None, self.identity)
                if not renewed and (taken or lost(self._last_renewed, self.clock(), self.renew_deadline)):
                    log.error("lost the lease (%s); stopping reconciles", f"{self._observation.record.holder} "
                              "holds it" if taken else f"not renewed for {self.renew_deadline:.0f}s")
                    self.leading.clear()
                    self.lost.set()
                    return
        except asyncio.CancelledError:
            if self.leading.is_set():
                await asyncio.shield(self.release())
            raise

    async def release(self) -> None:
        """Give the Lease up (a clean stop), so a standby need not wait for it to expire."""
        self.leading.clear()
        try:
            raw = await self.api.read()
            if raw is None:
                return
            record = LeaseRecord.parse(raw)
            if record.holder != self.identity:
                return
            await self.api.replace(record.resource_version, lease_body(self.identity, Action.RENEW, record,
                                                                       self.lease_duration, release=True))
            log.info("released the lease")
        except Exception as error:  # best effort: it expires by itself
            log.warning("could not release the lease: %s", error)
