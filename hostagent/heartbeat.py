"""The host heartbeat: a ``coordination.k8s.io/v1`` Lease per host, renewed every interval.

One API write per renewal: a JSON merge patch of renewTime (also re-asserting holder and duration,
so a hand-edited Lease heals). The Lease is created only when the patch finds none, so a restarted
agent keeps renewing the same object (same uid). The controller's host monitor reads renewTime and
leaseDurationSeconds to decide Up/Disconnected.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import time
import typing as t

from controllers.api.v1alpha1.common import SYSTEM_NAMESPACE
from controllers.api.v1alpha1.host import HEARTBEAT_LABEL, HOST_LABEL, heartbeat_lease_name

from .faults import FaultInjector, InjectedFailure
from .kube import MERGE_PATCH, AsyncKube, KubeError, resource_path

log = logging.getLogger(__name__)

MAX_BACKOFF = 30.0


def micro_time(now: datetime.datetime | None = None) -> str:
    """A Kubernetes MicroTime: RFC 3339 with microseconds, UTC."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Heartbeat:
    """Renews the Lease of one host."""

    def __init__(self, api: AsyncKube, host: str, *, interval: float, duration: int,
                 faults: FaultInjector | None = None, namespace: str = SYSTEM_NAMESPACE) -> None:
        self.api = api
        self.host = host
        self.interval = interval
        self.duration = duration
        self.faults = faults
        self.namespace = namespace
        self.name = heartbeat_lease_name(host)
        self.labels = {HEARTBEAT_LABEL: host, HOST_LABEL: host}
        self._labels_checked = False
        self._state = "starting"
        self.last_ok = time.monotonic()
        """When the Lease was last renewed (monotonic; the start counts, so a new agent is not fenced at once)."""
        self.lapsed_once = False
        """Set for good by a renewal that came after the Lease had expired (a paused process, a long partition):
        meanwhile the host may have been found Down and its guests restarted elsewhere."""
        self._renewals = 0

    def _transition(self, state: str, level: int, message: str, **fields: t.Any) -> None:
        """Log a state change once, not on every failed renewal."""
        if state != self._state:
            self._state = state
            log.log(level, message, extra={"host": self.host, "lease": self.name, **fields})

    def _path(self, name: str | None = None) -> str:
        return resource_path("coordination.k8s.io", "v1", "leases", name, namespace=self.namespace)

    async def renew(self) -> bool:
        """One renewal (or creation); whether the Lease is fresh now."""
        if self.faults is not None:
            try:
                await self.faults.inject("heartbeat", deadline=self.interval)
            except InjectedFailure as error:
                self._transition("fault", logging.WARNING, "heartbeat suppressed by an injected fault",
                                 error=str(error))
                return False
        now = micro_time()
        patch: dict[str, t.Any] = {"spec": {"holderIdentity": self.host, "leaseDurationSeconds": self.duration,
                                            "renewTime": now}}
        if not self._labels_checked:
            patch["metadata"] = {"labels": self.labels}
        timeout = max(1.0, min(self.interval, 10.0))
        try:
            await self.api.request("PATCH", self._path(self.name), body=patch, content_type=MERGE_PATCH,
                                   timeout=timeout)
        except KubeError as error:
            if error.status != 404:
                return self._failed(error)
            return await self._create(now, timeout)
        self._labels_checked = True
        self._renewed()
        return True

    async def _create(self, now: str, timeout: float) -> bool:
        body = {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": self.labels},
            "spec": {"holderIdentity": self.host, "leaseDurationSeconds": self.duration,
                     "acquireTime": now, "renewTime": now},
        }
        try:
            lease = await self.api.request("POST", self._path(), body=body, timeout=timeout)
        except KubeError as error:
            if error.status == 404 and error.details.get("kind") == "namespaces":
                self._transition("no-namespace", logging.ERROR,
                                 f"namespace {self.namespace} does not exist: the heartbeat Lease cannot be created "
                                 "until it does; retrying with backoff", error=error.message)
                return False
            if error.status == 409:  # created meanwhile (a racing restart); renew next time
                return False
            return self._failed(error)
        self._labels_checked = True
        log.info("heartbeat lease created", extra={"host": self.host, "lease": self.name,
                                                  "uid": lease["metadata"].get("uid")})
        self._renewed()
        return True

    def lapsed(self) -> bool:
        """Whether the Lease, once renewed, expired at some point (or is expired now): the watch caches of this
        host's guests may still show placements the controller has since changed."""
        return self.lapsed_once or (self._renewals > 0 and time.monotonic() - self.last_ok > self.duration)

    def _renewed(self) -> None:
        now = time.monotonic()
        self._renewals += 1
        if self._renewals > 1 and now - self.last_ok > self.duration:
            self.lapsed_once = True
            log.warning("heartbeat renewed after the Lease had expired: each guest start first confirms its "
                        "placement with a direct GET", extra={"host": self.host,
                                                                "silent_seconds": round(now - self.last_ok, 1)})
        self.last_ok = now
        self._transition("ok", logging.DEBUG if self._state == "starting" else logging.INFO,
                         "heartbeat renewing" if self._state == "starting" else "heartbeat renewing again")

    def _failed(self, error: KubeError) -> bool:
        if error.status is None:
            # ApiHealth logs the outage once for the whole process.
            self._transition("unreachable", logging.DEBUG, "heartbeat: apiserver unreachable", error=error.message)
        elif error.unavailable:  # 429/5xx: an apiserver starting up or overloaded; retry next interval
            self._transition("unreachable", logging.WARNING, "heartbeat renewal refused for now",
                             status=error.status, error=error.message)
        else:
            self._transition(f"error-{error.status}", logging.ERROR, "heartbeat renewal failed",
                             status=error.status, error=error.message)
        return False

    async def run(self, present: asyncio.Event) -> None:
        """Renew every interval while ``present`` is set (the Host exists). The period runs from the
        start of each renewal, so request latency does not stretch it. An outage or an injected fault
        retries at the next interval; a missing namespace or a refused request backs off up to 30 s."""
        failures = 0
        first = True
        while True:
            await present.wait()
            started = time.monotonic()
            if await self.renew():
                failures = 0
                # Spread the renewals of many hosts over the interval after the first one.
                delay = self.interval * random.uniform(0.5, 1.0) if first else self.interval
                first = False
            else:
                failures += 1
                delay = self.interval if self._state in ("unreachable", "fault") else \
                    min(max(self.interval, MAX_BACKOFF), self.interval * 2 ** (failures - 1))
            # The period runs from the start of the renewal; a slow one is not followed by a burst.
            await asyncio.sleep(max(0.0, started + delay - time.monotonic()))
