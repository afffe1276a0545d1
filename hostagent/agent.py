"""The agent proper: caches of the objects a host needs, one worker per host, and the reconcilers of the
objects bound to the agent's hosts.

A worker renews its host's heartbeat Lease and reports ``status.node`` (the only Host field the agent
writes, DESIGN.md §3): facts from the hypervisor driver, reachability of the host's pools and its
zone's image stores, presence of its zone's traffic-label bridges. It gathers every check interval,
or at once when something it depends on changes, and patches only when the report says something
new (or to refresh reportedAt every ``report_refresh`` seconds).

The reconcilers (:mod:`.templates`, :mod:`.volumes`, :mod:`.vms`, :mod:`.snapshots`) watch the Templates,
Volumes, VirtualMachines and Snapshots labelled ``cumulo.io/host=<one of the agent's hosts>`` and do the host's part of them with
that host's drivers, writing only their own status keys (``download``, ``node``, ``node``).
"""

from __future__ import annotations

import asyncio
import datetime
import importlib.metadata
import logging
import os
import time
import typing as t

from controllers.api.v1alpha1.common import API_VERSION, GROUP, VERSION
from controllers.api.v1alpha1.host import (
    NODE_CLUSTER_LABEL,
    SIMULATOR_FAULTS_ANNOTATION,
    HeartbeatPool,
    NodeInfo,
    PeerHeartbeat,
    StorageReport,
)
from controllers.api.v1alpha1.storagepool import PoolScope, PoolType

from . import inventory, metrics
from .config import AgentConfig
from .drivers.hypervisor import HostFacts, HypervisorDriver, HypervisorError
from .drivers.network import NetworkDriver, NetworkError
from .drivers.storage import StorageDriver, StorageError
from .faults import FaultConfigError, FaultInjector, parse_faults
from .heartbeat import Heartbeat
from .storageheartbeat import (
    FileHeartbeatStore,
    HeartbeatStore,
    MemoryHeartbeatStore,
    PoolTypeHeartbeatStore,
    RadosHeartbeatStore,
    StorageHeartbeat,
)
from .migrations import MigrationReconciler
from .kube import MERGE_PATCH, AsyncKube, Informer, KubeError, resource_path
from .rbdpools import RbdPools
from .routers import RouterReconciler
from .snapshots import SnapshotReconciler
from .templates import TemplateReconciler
from .vms import VmReconciler
from .volumes import VolumeReconciler

log = logging.getLogger(__name__)

"""Label on a Kubernetes Node: its agent registers the Host in this Cluster if the Host is missing."""

OTHERS_SYNC_TIMEOUT = 5.0
"""How long the first reports wait for the StoragePool, ImageStore and PhysicalNetwork lists."""

WAKE_DEBOUNCE = 0.2
"""Changes arriving together (a relist, a `kubectl apply -f dir`) cause one gather, not many."""


def agent_version() -> str:
    try:
        return importlib.metadata.version("cumulo")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def _spec_changed(old: dict[str, t.Any] | None, new: dict[str, t.Any] | None) -> bool:
    """Pools, stores and networks matter to the agent by spec and existence, not by status (which the
    controller rewrites as hosts report)."""
    if old is None or new is None:
        return True
    return old.get("spec") != new.get("spec") or \
        old["metadata"].get("deletionTimestamp") != new["metadata"].get("deletionTimestamp")


REFUSED_REPORT_RETRY_SECONDS = 60.0
"""A status.node patch the apiserver refused (RBAC, schema) is tried again after this, unless it changed."""


class HostWorker:
    """Heartbeat and status.node reports of one host."""

    def __init__(self, agent: Agent, name: str, *, hypervisor: HypervisorDriver, storage: StorageDriver,
                 network: NetworkDriver, faults: FaultInjector | None) -> None:
        self.agent = agent
        self.name = name
        self.hypervisor = hypervisor
        self.storage = storage
        self.network = network
        self.faults = faults
        config = agent.config
        self.heartbeat = Heartbeat(agent.api, name, interval=config.heartbeat_interval,
                                   duration=config.lease_duration, faults=faults)
        store: HeartbeatStore = MemoryHeartbeatStore(faults) if faults is not None else PoolTypeHeartbeatStore(
            FileHeartbeatStore(), RadosHeartbeatStore(self._rbd_driver) if getattr(agent, "rbd_pools", None) else None)
        self.storage_heartbeat = StorageHeartbeat(self, store, interval=config.storage_heartbeat_interval,
                                                  fence_after=config.fence_after)
        self.host: dict[str, t.Any] | None = None
        self.reported: dict[str, t.Any] | None = None  # status.node as the apiserver has it
        self.facts: HostFacts | None = None
        self._inputs: tuple[t.Any, ...] | None = None
        self._wake = asyncio.Event()
        self._present = asyncio.Event()  # the Host exists: heartbeats run
        self._retry_after = 0.0
        self._refused: dict[str, t.Any] | None = None  # a report the apiserver refused (RBAC, schema)
        self._states: dict[str, str] = {}

    def _transition(self, key: str, state: str, level: int, message: str, **fields: t.Any) -> None:
        if self._states.get(key) != state:
            self._states[key] = state
            log.log(level, message, extra={"host": self.name, **fields})

    # -- inputs ----------------------------------------------------------------------------------

    def observe(self, host: dict[str, t.Any] | None) -> None:
        """The Host object changed (None: deleted)."""
        self.host = host
        self.storage_heartbeat.observe(host)
        if host is None:
            self._present.clear()
        else:
            self._present.set()
        inputs = inventory.host_inputs(host)
        if inputs == self._inputs:
            return
        if self._inputs is None or inputs[0] != self._inputs[0]:
            # First sight, or a new object under the same name: start from what it holds.
            self.reported = ((host or {}).get("status") or {}).get("node")
        self._inputs = inputs
        self._configure_faults(host)
        self.wake()

    def _configure_faults(self, host: dict[str, t.Any] | None) -> None:
        text = (((host or {}).get("metadata") or {}).get("annotations") or {}).get(SIMULATOR_FAULTS_ANNOTATION)
        if self.faults is None:
            if text:
                self._transition("faults", "ignored", logging.WARNING,
                                 f"{SIMULATOR_FAULTS_ANNOTATION} is ignored: this host is not simulated")
            return
        if not text and "faults" not in self._states:
            self._states["faults"] = "ok None"  # no annotation from the start: nothing to say
        try:
            faults = parse_faults(text)
        except FaultConfigError as error:
            self._transition("faults", f"invalid {text}", logging.ERROR,
                             f"invalid {SIMULATOR_FAULTS_ANNOTATION} annotation; no faults injected",
                             error=str(error))
            faults = {}
        else:
            self._transition("faults", f"ok {text or None}", logging.INFO, "simulator faults configured",
                             faults=sorted(faults))
        self.faults.configure(faults)

    def wake(self) -> None:
        self._wake.set()

    # -- loops -----------------------------------------------------------------------------------

    async def run(self) -> None:
        await asyncio.gather(self.heartbeat.run(self._present), self._report_loop(), self.storage_heartbeat.run())

    async def _report_loop(self) -> None:
        interval = self.agent.config.check_interval
        while True:
            try:
                if self.host is None:
                    await self._register()
                else:
                    await self._report()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one round must not end the host's reports
                log.exception("report round failed", extra={"host": self.name})
            try:
                await asyncio.wait_for(self._wake.wait(), interval)
                await asyncio.sleep(WAKE_DEBOUNCE)
            except TimeoutError:
                pass
            self._wake.clear()

    async def _register(self) -> None:
        cluster = await self.agent.registration_cluster()
        if cluster is None:
            self._transition("host", "missing", logging.WARNING,
                             "Host object does not exist; waiting for it to be created (or run the agent with "
                             f"--register-cluster, or label the node {NODE_CLUSTER_LABEL}=<cluster>)")
            return
        spec: dict[str, t.Any] = {"cluster": cluster}
        if self.agent.config.node_name:
            spec["nodeName"] = self.agent.config.node_name
        body = {"apiVersion": API_VERSION, "kind": "Host", "metadata": {"name": self.name}, "spec": spec}
        try:
            host = await self.agent.api.request("POST", resource_path(GROUP, VERSION, "hosts"), body=body)
        except KubeError as error:
            if error.status == 409:  # it exists; the watch brings it
                return
            if error.status is not None:
                self._transition("host", f"register-{error.status}", logging.ERROR, "cannot register the Host",
                                 cluster=cluster, error=error.message)
            return
        self._transition("host", "registered", logging.INFO, "registered the Host", cluster=cluster)
        if self.host is None:
            self.observe(host)

    async def _facts(self) -> tuple[bool, str]:
        deadline = self.agent.config.call_timeout + 5
        try:
            self.facts = await asyncio.wait_for(self.hypervisor.host_facts(), deadline)
        except HypervisorError as error:
            return False, str(error)
        except TimeoutError:
            return False, f"the hypervisor did not answer within {deadline:g}s"
        return True, ""

    async def storage_for(self, pool: str | None, rbd: t.Mapping[str, t.Any] | None) -> StorageDriver:
        """The storage driver of a pool: the host's own (directories; a simulated host's everything), or the
        pool's RBD driver for an RBD pool (``rbd``: its spec.rbd). Raises StorageError (the key's Secret)."""
        if not rbd or self.agent.rbd_pools is None or not pool:
            return self.storage
        return t.cast(StorageDriver, await self.agent.rbd_pools.driver(pool, rbd))

    async def _check(self, target: inventory.StorageTarget) -> StorageReport:
        if target.unsupported is not None or target.path is None:
            return StorageReport(reachable=False, message=target.unsupported or "no path")
        try:
            storage = await self.storage_for(target.name, target.rbd)
        except StorageError as error:
            return StorageReport(reachable=False, message=str(error))
        return await storage.check(target.path, create=target.create, writable=target.writable)

    async def _bridge(self, label: str) -> bool:
        try:
            return await self.network.bridge_exists(label)
        except NetworkError as error:
            self._transition(f"bridge {label}", "error", logging.WARNING, "cannot check bridge", error=str(error))
            return False

    async def gather(self) -> dict[str, t.Any]:
        """The current report, as the JSON ``status.node`` (None values: unknown, removed by the patch)."""
        assert self.host is not None
        placement = inventory.Placement.of(self.host)
        agent = self.agent
        pools = inventory.pools_for_host(placement, agent.pools.cache.values())
        self.storage_heartbeat.pools = self._heartbeat_pools({target.name for target in pools})
        stores = inventory.stores_for_host(placement, agent.stores.cache.values())
        labels = inventory.bridge_labels_for_host(placement, agent.networks.cache.values())
        (healthy, message), pool_reports, store_reports, bridges = await asyncio.gather(
            self._facts(),
            asyncio.gather(*(self._check(target) for target in pools)),
            asyncio.gather(*(self._check(target) for target in stores)),
            asyncio.gather(*(self._bridge(label) for label in labels)),
        )
        if healthy:
            # The first healthy round is the normal start, worth a line only at debug level.
            self._transition("hypervisor", "healthy", logging.INFO if "hypervisor" in self._states else logging.DEBUG,
                             "hypervisor healthy")
        else:
            self._transition("hypervisor", f"unhealthy {message}", logging.WARNING, "hypervisor unhealthy",
                             error=message)
        facts = self.facts
        node = NodeInfo(
            hypervisor_type=self.hypervisor.hypervisor_type,
            hypervisor_version=facts.hypervisor_version if facts else None,
            libvirt_version=facts.libvirt_version if facts else None,
            virt_type=facts.virt_type if facts else None,
            cpu_model=facts.cpu_model if facts else None,
            cpu_sockets=facts.cpu_sockets if facts else None,
            cpu_cores=facts.cpu_cores if facts else None,
            cpu_speed_mhz=facts.cpu_speed_mhz if facts else None,
            memory_mib=facts.memory_mib if facts else None,
            architecture=facts.architecture if facts else None,
            kernel_version=agent.kernel_version,
            agent_version=agent.version,
            private_ip=agent.private_ip,
            hypervisor_healthy=healthy,
            message=message,
            storage_pools={target.name: report for target, report in zip(pools, pool_reports)},
            image_stores={target.name: report for target, report in zip(stores, store_reports)},
            bridges=dict(zip(labels, bridges)),
            investigations={suspect: {pool: PeerHeartbeat.model_validate(reading) for pool, reading in answer.items()}
                            for suspect, answer in self.storage_heartbeat.answers.items()},
            reported_at=datetime.datetime.now(datetime.timezone.utc),
        )
        return node.model_dump(by_alias=True, mode="json")

    def _heartbeat_pools(self, names: set[str]) -> list[HeartbeatPool]:
        """The shared pools (SharedMountPoint, RBD) among the host's pools."""
        found = []
        for pool in self.agent.pools.cache.values():
            spec = pool.get("spec") or {}
            name = pool["metadata"]["name"]
            if name not in names or spec.get("scope") == PoolScope.HOST:
                continue
            if spec.get("type") == PoolType.SHARED_MOUNT_POINT and spec.get("path"):
                found.append(HeartbeatPool(name=name, type=spec["type"], path=spec["path"]))
            elif spec.get("type") == PoolType.RBD and (spec.get("rbd") or {}).get("pool"):
                found.append(HeartbeatPool(name=name, type=spec["type"], path=spec["rbd"]["pool"]))
        return sorted(found, key=lambda pool: pool.name)

    async def _rbd_driver(self, name: str) -> t.Any:
        """The RBD driver of StoragePool ``name`` (the storage heartbeat's RADOS objects), None if not RBD."""
        pool = next((p for p in self.agent.pools.cache.values() if p["metadata"]["name"] == name), None)
        rbd = ((pool or {}).get("spec") or {}).get("rbd")
        if not rbd or self.agent.rbd_pools is None:
            return None
        return await self.agent.rbd_pools.driver(name, rbd)

    async def _report(self) -> None:
        node = await self.gather()
        now = datetime.datetime.now(datetime.timezone.utc)
        if not inventory.needs_report(self.reported, node, now=now,
                                      refresh_seconds=self.agent.config.report_refresh):
            return
        if time.monotonic() < self._retry_after and not inventory.significant_change(self._refused, node):
            return  # the same report was refused a moment ago
        patch = {"status": {"node": inventory.node_patch(self.reported, node)}}
        path = resource_path(GROUP, VERSION, "hosts", self.name, subresource="status")
        try:
            host = await self.agent.api.request("PATCH", path, body=patch, content_type=MERGE_PATCH)
        except KubeError as error:
            if error.status == 404:
                self.reported = None  # the Host went away; the watch says so too
            elif not error.unavailable:  # an outage or overload just retries next round
                # Refused (RBAC, schema): say so once, and retry a minute later, not every round.
                self._retry_after = time.monotonic() + REFUSED_REPORT_RETRY_SECONDS
                self._refused = node
                self._transition("report", f"error-{error.status}", logging.ERROR, "status.node patch refused",
                                 status=error.status, error=error.message)
            return
        self.reported = (host.get("status") or {}).get("node")
        self._retry_after = 0.0
        self._transition("report", "ok", logging.INFO if "report" in self._states else logging.DEBUG,
                         "reporting status.node")
        log.debug("reported status.node", extra={"host": self.name})


class Agent:
    """The agent process: informers, drivers and one :class:`HostWorker` per host."""

    def __init__(self, config: AgentConfig, api: AsyncKube, workers: t.Callable[[Agent], list[HostWorker]]) -> None:
        self.config = config
        self.api = api
        self.version = agent_version()
        self.kernel_version = os.uname().release
        self.private_ip = config.private_ip
        self._node_cluster: str | None = None
        self._node_checked = False
        kube, health = api.kube, api.health
        names = list(config.hosts)
        # One host: the apiserver sends only its own Host. Many (simulation): all Hosts (≤ ~1000),
        # filtered here, as a set-based selector of 1000 names would not fit in a URL.
        self.hosts = Informer(kube, "Host", resource_path(GROUP, VERSION, "hosts"), self._host_event,
                              field_selector=f"metadata.name={names[0]}" if len(names) == 1 else None,
                              health=health)
        self.pools = Informer(kube, "StoragePool", resource_path(GROUP, VERSION, "storagepools"),
                              self._dependency_event, health=health)
        self.stores = Informer(kube, "ImageStore", resource_path(GROUP, VERSION, "imagestores"),
                               self._dependency_event, health=health)
        self.networks = Informer(kube, "PhysicalNetwork", resource_path(GROUP, VERSION, "physicalnetworks"),
                                 self._dependency_event, health=health)
        self.informers = [self.hosts, self.pools, self.stores, self.networks]
        # RBD pools of real hosts: one Ceph connection per pool (simulated hosts use their simulator storage).
        self.rbd_pools = RbdPools(api, names[0]) if config.storage_driver == "filesystem" else None
        self.workers: dict[str, HostWorker] = {}
        self._make_workers = workers
        self.templates = TemplateReconciler(self, download_concurrency=config.download_concurrency,
                                            resync_seconds=config.resync)
        self.volumes = VolumeReconciler(self, resync_seconds=config.resync)
        self.vms = VmReconciler(self, stop_timeout=config.stop_timeout, sweep_seconds=config.orphan_sweep,
                                resync_seconds=config.vm_resync, concurrency=config.process_vm_concurrency)
        self.routers = RouterReconciler(self, sweep_seconds=config.orphan_sweep, resync_seconds=config.resync)
        self.migrations = MigrationReconciler(self, resync_seconds=config.resync)
        self.snapshots = SnapshotReconciler(self, concurrency=2, resync_seconds=config.resync)
        self.reconcilers = [self.templates, self.volumes, self.vms, self.routers, self.migrations, self.snapshots]
        # Not part of the initial sync: heartbeats and host reports do not wait for them, and each reconciler
        # waits for its own informer where it must (the orphan sweep).
        self.object_informers = [reconciler.informer for reconciler in self.reconcilers]

    def _host_event(self, kind: str, old: dict[str, t.Any] | None, new: dict[str, t.Any] | None) -> None:
        name = (new or old or {}).get("metadata", {}).get("name")
        worker = self.workers.get(name)
        if worker is not None:
            worker.observe(new)

    def _dependency_event(self, kind: str, old: dict[str, t.Any] | None, new: dict[str, t.Any] | None) -> None:
        if _spec_changed(old, new):
            for worker in self.workers.values():
                worker.wake()

    async def registration_cluster(self) -> str | None:
        """The cluster to register missing Hosts in: --register-cluster, else the node's label."""
        if self.config.register_cluster:
            return self.config.register_cluster
        if self._node_checked or not self.config.node_name:
            return self._node_cluster
        try:
            node = await self.api.request("GET", resource_path("", "v1", "nodes", self.config.node_name))
        except KubeError as error:
            if error.status is None:
                return None  # ask again next round
            self._node_checked = True
            log.info("cannot read the agent's Node; no auto-registration",
                     extra={"node": self.config.node_name, "status": error.status, "error": error.message})
            return None
        self._node_checked = True
        self._node_cluster = ((node.get("metadata") or {}).get("labels") or {}).get(NODE_CLUSTER_LABEL)
        return self._node_cluster

    async def _initial_sync(self, stop: asyncio.Event) -> bool:
        """Wait for the first list of Hosts (needed: registration decides on it), then a little for the
        others, so the first report is complete. A kind that cannot be listed (RBAC, CRD missing) is
        reported as it comes and must not hold up the heartbeats. False if stopped meanwhile."""
        stopping = asyncio.ensure_future(stop.wait())
        try:
            hosts = asyncio.ensure_future(self.hosts.synced.wait())
            await asyncio.wait([hosts, stopping], return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                hosts.cancel()
                return False
            others = asyncio.ensure_future(asyncio.gather(*(informer.synced.wait() for informer in self.informers[1:])))
            await asyncio.wait([others, stopping], timeout=OTHERS_SYNC_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
            others.cancel()
            await asyncio.gather(others, return_exceptions=True)  # retrieved, so asyncio does not log it
            missing = [informer.kind for informer in self.informers if not informer.synced.is_set()]
            if missing:
                log.warning("starting before these kinds could be listed; their checks follow once they are",
                            extra={"kinds": missing})
            return not stop.is_set()
        finally:
            stopping.cancel()

    async def run(self, stop: asyncio.Event) -> None:
        for informer in [*self.informers, *self.object_informers]:
            informer.start()
        tasks: list[asyncio.Task[None]] = []
        try:
            if not await self._initial_sync(stop):
                return
            self.workers = {worker.name: worker for worker in self._make_workers(self)}
            for worker in self.workers.values():
                worker.observe(self.hosts.cache.get(worker.name))
            log.info("agent started", extra={"hosts": len(self.workers), "hypervisor": self.config.hypervisor,
                                             "apiserver": self.api.kube.server})
            tasks = [asyncio.create_task(worker.run(), name=f"host-{worker.name}") for worker in self.workers.values()]
            tasks += [asyncio.create_task(reconciler.run(), name=reconciler.kind) for reconciler in self.reconcilers]
            tasks += [asyncio.create_task(loop, name="metrics") for loop in metrics.instrument(self)]
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for download in list(self.templates.downloads.values()):
                download.cancel.set()
            for informer in [*self.informers, *self.object_informers]:
                informer.stop()
            drivers = {id(driver): (worker.name, driver) for worker in self.workers.values()
                       for driver in (worker.hypervisor, worker.storage, worker.network)}
            for name, driver in drivers.values():  # shared drivers (simulation) close once
                try:
                    await driver.close()
                except Exception:
                    log.exception("closing a driver failed", extra={"host": name})
            if self.rbd_pools is not None:
                await self.rbd_pools.close()
