"""VirtualRouters: the agent of the host a guest network's router is bound to runs it as a network namespace
(:mod:`hostagent.router`) configured entirely from the object's spec, and reports ``status.node``
(RouterNode: host, namespace, Running|Error, message, appliedGeneration, dnsmasqPid, reportedAt).

Per VirtualRouter (level-based, on every event and every ``resync_seconds``): apply the spec
(:meth:`RouterRuntime.apply` changes only what differs, so an unchanged router is left alone: no dnsmasq
restart, no ruleset reload). ``appliedGeneration`` is the ``metadata.generation`` whose spec the router now
runs; on an error it stays at the last one applied and ``state`` says Error with the reason.

A router whose object is gone or bound elsewhere is torn down by the sweep (after the informer synced, every
``sweep_seconds`` and whenever a VirtualRouter leaves the cache): router namespaces and state directories of
this host that no cached VirtualRouter explains are suspects, and are removed only once a LIST from the API
itself (not the cache) confirms that no VirtualRouter bound here needs them: a lagging watch never tears a
router down. Teardown: dnsmasq and any other process in the namespace, the host-side veths, the namespace,
the segments (unplug, release), the state directory.

Agent restart: routers are found by name (namespace, veths, pidfile) and adopted as they run.

Hosts on the ``simulator`` network driver (scale simulations) have no network to build on: their routers are
reported Running without a namespace being made.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import typing as t

import pydantic

from controllers.api.v1alpha1.common import GROUP, VERSION
from controllers.api.v1alpha1.virtualrouter import RouterNode, VirtualRouterSpec

from .executor import Executor, SubprocessExecutor
from .inventory import prune
from .kube import KubeError, resource_path
from .reconciler import ObjectReconciler, host_selector
from .router import netns_prefix
from .router.runtime import Owner, RouterError, RouterRuntime

log = logging.getLogger(__name__)

RUNNING, ERROR = "Running", "Error"


class RouterReconciler(ObjectReconciler):
    kind = "VirtualRouter"
    plural = "virtualrouters"
    status_key = "node"

    def __init__(self, agent: t.Any, *, sweep_seconds: float = 30.0, executor: Executor | None = None,
                 **kwargs: t.Any) -> None:
        super().__init__(agent, **kwargs)
        config = agent.config
        self.simulated = config.network_driver == "simulator"
        self.runtime = RouterRuntime(config.state_dir, config.host_netns, executor or SubprocessExecutor(concurrency=4))
        self.sweep_seconds = sweep_seconds
        self._locks: dict[str, asyncio.Lock] = {}
        self._sweep_wake = asyncio.Event()
        self.swept = asyncio.Event()  # the first sweep is done (tests, readiness)

    def _lock(self, network_uid: str) -> asyncio.Lock:
        return self._locks.setdefault(network_uid[:8], asyncio.Lock())

    def on_event(self, kind: str, key: str, old: dict[str, t.Any] | None, new: dict[str, t.Any] | None) -> None:
        if kind == "DELETED":
            self._sweep_wake.set()  # its router, if any, is a suspect now

    # -- reconcile -------------------------------------------------------------------------------

    def _spec(self, obj: t.Mapping[str, t.Any]) -> VirtualRouterSpec | None:
        try:
            return VirtualRouterSpec.model_validate(obj.get("spec") or {})
        except pydantic.ValidationError:
            return None

    def _placed_here(self, obj: t.Mapping[str, t.Any]) -> VirtualRouterSpec | None:
        """The spec, if the object is bound to one of this agent's hosts and its spec names that host."""
        host = self.bound_host(obj)
        spec = self._spec(obj)
        if host is None or spec is None or spec.host != host:
            return None
        return spec

    async def reconcile(self, key: str, obj: dict[str, t.Any] | None) -> float | None:
        if obj is None:
            self.queue.forget(key)
            self.forget_states(key)
            self._sweep_wake.set()
            return None
        meta = obj["metadata"]
        previous = (obj.get("status") or {}).get(self.status_key) or {}
        host = self.bound_host(obj)
        try:
            spec = VirtualRouterSpec.model_validate(obj.get("spec") or {})
        except pydantic.ValidationError as error:
            message = f"spec cannot be read: {str(error).splitlines()[0]}"
            self.transition(key, "spec", "invalid", logging.ERROR, "VirtualRouter spec cannot be read", error=message)
            await self.report(key, obj, self._node(previous, host=host, state=ERROR, message=message,
                                                   applied_generation=previous.get("appliedGeneration")))
            return None
        if spec.host != host:
            # Labelled for this host, configured for another: the controller is moving it; wait for both to agree.
            self._sweep_wake.set()
            return None
        netns = self.runtime.netns(spec.network_uid)
        generation = meta.get("generation")
        if self.simulated:
            await self.report(key, obj, self._node(previous, host=host, namespace=netns, state=RUNNING,
                                                   message="simulated host: no router namespace is made",
                                                   applied_generation=generation))
            return None
        worker = self.worker(host)
        assert worker is not None  # bound_host names one of this agent's hosts
        delay = None
        async with self._lock(spec.network_uid):
            try:
                applied = await self.runtime.apply(spec, namespace=str(meta.get("namespace", "")),
                                                   name=str(meta["name"]), uid=str(meta.get("uid", "")),
                                                   network=worker.network)
            except RouterError as error:
                message = str(error)
                self.transition(key, "apply", f"error {message}", logging.WARNING, "router configuration failed",
                                error=message, netns=netns)
                delay = self.queue.backoff(key)
                pid = self.runtime.dnsmasq_pid(netns, self.runtime.paths(spec.network_uid))
                node = self._node(previous, host=host, namespace=netns, state=ERROR, message=message,
                                  applied_generation=previous.get("appliedGeneration"), dnsmasq_pid=pid)
            else:
                self.queue.forget(key)
                if applied.changed:
                    log.info("router configured", extra={"object": key, "netns": netns, "generation": generation,
                                                         "changed": applied.changed})
                self.transition(key, "apply", "ok", logging.INFO, "router running", netns=netns,
                                dnsmasq_pid=applied.dnsmasq_pid)
                node = self._node(previous, host=host, namespace=netns, state=RUNNING,
                                  message="; ".join(applied.warnings), applied_generation=generation,
                                  dnsmasq_pid=applied.dnsmasq_pid)
        await self.report(key, obj, node)
        return delay

    @staticmethod
    def _node(previous: t.Mapping[str, t.Any], **fields: t.Any) -> dict[str, t.Any]:
        """``status.node``; reportedAt moves only when something else does (an unchanged router is not
        re-reported on every resync)."""
        node = RouterNode(**fields, reported_at=datetime.datetime.now(datetime.timezone.utc))
        report: dict[str, t.Any] = node.model_dump(by_alias=True, mode="json")

        def stable(value: t.Mapping[str, t.Any]) -> dict[str, t.Any]:
            return {k: v for k, v in prune(value).items() if k != "reportedAt"}

        if previous.get("reportedAt") and stable(previous) == stable(report):
            report["reportedAt"] = previous["reportedAt"]
        return report

    # -- sweep: orphans ----------------------------------------------------------------------------

    def background(self) -> list[t.Coroutine[t.Any, t.Any, None]]:
        return [self.sweep_loop(self.sweep, seconds=self.sweep_seconds, wake=self._sweep_wake, swept=self.swept,
                                what="router sweep")]

    def _explained(self, objects: t.Iterable[t.Mapping[str, t.Any]]) -> set[str]:
        """uid[:8] of the Networks whose routers these objects want on this agent's hosts."""
        return {spec.network_uid[:8] for obj in objects if (spec := self._placed_here(obj)) is not None}

    async def sweep(self) -> None:
        """Tear down the routers of this host that no VirtualRouter bound here needs (confirmed by the API)."""
        if self.simulated:
            return
        explained = self._explained(self.informer.cache.values())
        prefix = netns_prefix(self.agent.config.host_netns)
        suspects: dict[str, tuple[str, Owner | None]] = {}
        for name in await asyncio.to_thread(self.runtime.namespaces):
            short = name[len(prefix):]
            if short not in explained:
                suspects[short] = (short, None)
        for network_uid, owner in await asyncio.to_thread(self.runtime.owners):
            if network_uid[:8] in explained or (owner is not None and owner.host not in self.hosts):
                continue
            suspects[network_uid[:8]] = (network_uid, owner)
        if not suspects:
            return
        try:
            listing = await self.agent.api.request(
                "GET", resource_path(GROUP, VERSION, self.plural),
                query={"labelSelector": host_selector(list(self.agent.config.hosts))})
        except KubeError as error:
            self.transition("", "sweep", f"unconfirmed {error.message}", logging.INFO,
                            "cannot confirm that routers are orphaned; leaving them alone", error=error.message)
            return
        self._states.pop(("", "sweep"), None)
        live = self._explained(listing.get("items") or [])
        for short, (network_uid, owner) in sorted(suspects.items()):
            if short in live:
                continue  # the cache lags; the object's own reconcile takes over when it catches up
            worker = self.worker(owner.host) if owner is not None else None
            if worker is None and self.agent.workers:
                worker = next(iter(self.agent.workers.values()))
            async with self._lock(network_uid):
                log.warning("removing a router no VirtualRouter bound here needs", extra={
                    "object": owner.key if owner else None, "network_uid": network_uid,
                    "netns": owner.netns if owner else f"{prefix}{short}"})
                try:
                    await self.runtime.teardown(network_uid, owner, worker.network if worker else None)
                except Exception as error:  # the next sweep tries again
                    log.warning("cannot remove a router", extra={"network_uid": network_uid, "error": str(error)})
