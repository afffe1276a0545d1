"""VirtualMachines: the agent of the host a guest is placed on runs its domain as ``status.launch`` says, and
reports what it observes in ``status.node`` (DomainInfo).

Per VirtualMachine (one reconcile at a time per object, level-based, on every event, when a listing of the
host's domains every ``resync_seconds`` finds its domain out of step, and every ``full_resync_seconds``):

* launch ``Running``: a transient domain (UUID = the object's uid) runs; if not, it is started (config
  drive and console file prepared first). A running domain is adopted as it is: never restarted. Data
  disks added to or removed from the launch are hot-plugged / unplugged. A guest that powers itself off is
  started again (the launch says Running), with a growing delay if it keeps stopping right after starting.
* launch ``Stopped``: an ACPI shutdown, repeated every ``shutdown_retry_seconds`` (a guest ignores the power
  button until its ACPI daemon runs), then a hard stop after ``stop_timeout`` seconds.
* ``status.node`` is patched only when the report changes.

Networking: before a domain starts, the agent makes every NIC's segment exist on the host (the network driver's
``ensure_segment``; libvirt plugs taps into the segment bridge itself, the netns driver plugs its veths), and
re-ensures the segments of a running guest it adopts after a restart (idempotent). Security groups of NICs on
Linux bridge segments are enforced on the host (:mod:`hostagent.securitygroups`) while the guest runs and
follow every change of the launch. When a guest stops, its rules go, and segments no running guest of the
host uses any more are released (the driver keeps a bridge that still has ports, such as a router's).

A sweep (at start, every ``sweep_seconds`` and whenever a VirtualMachine leaves the cache) lists the
hypervisor's domains: a Cumulo domain of this agent's hosts whose VirtualMachine the cache shows placed
here is adopted (queued: its reconcile takes over, the domain untouched); any other is destroyed, but only
once a direct GET of the VirtualMachine (not the cache) confirms that it is gone, recreated, stopped or
placed elsewhere: a lagging watch never kills a guest.

User data from a Secret (``spec.userDataSecretRef``): the launch carries only a reference (namespace, name, key);
the agent of the guest's host GETs the Secret each time it starts the domain and writes the content into the
config drive file alone (mode 0600) — never into an object, a report or a log line (the "domain started" line
names the Secret and the content's sha256, which the test guest also prints). A missing Secret or key refuses
the start with a message in ``status.node.message`` (the guest shows StartFailed) and the start is retried with
backoff. Simulated hosts read the Secret too (so they fail the same way) but have no drive to write.

Files of a guest (libvirt hosts only): ``<state-dir>/vms/<uid>/`` holds ``console.log`` (the serial
console, written by QEMU), ``config-drive.iso`` and ``owner.json`` (namespace and name, so a janitor can
confirm the VirtualMachine is gone before removing the directory).
"""

from __future__ import annotations

import asyncio
import dataclasses
import base64
import binascii
import datetime
import hashlib
import json
import logging
import os
import random
import shutil
import time
import typing as t

import pydantic

from controllers.api.v1alpha1.virtualmachine import LaunchSpec
from controllers.api.v1alpha1.common import SecretKeyReference

from controllers.api.v1alpha1.network import Segment

from . import vmspec
from .configdrive import write_config_drive
from .drivers.hypervisor import Domain, DomainState, HypervisorDriver, HypervisorError
from .drivers.network import NetworkError
from .drivers.storage import StorageError
from .drivers.network.simulator import SimulatorNetworkDriver
from .executor import SubprocessExecutor
from .kube import KubeError, resource_path
from .reconciler import ObjectReconciler
from .securitygroups import SecurityGroupEnforcer, SecurityGroupError, guest_nics

if t.TYPE_CHECKING:
    from .agent import HostWorker

log = logging.getLogger(__name__)

CONSOLE_ROTATE_BYTES = 8 * 1024**2
"""A console log bigger than this when its guest starts is moved to console.log.1 (one old log is kept)."""

RESTART_WINDOW = 30.0
"""A guest that stops by itself within this many seconds of its start is restarted with a growing delay."""

RESTART_MAX_DELAY = 300.0
DETACH_RETRY_SECONDS = 5.0
STOPPING_POLL = 1.0
FENCED_RETRY = 2.0
FULL_RESYNC_SECONDS = 300.0
"""Every guest is reconciled at least this often; in between, only those a domain listing finds out of step."""


class DisksPending(Exception):
    """A disk of the launch is still being created by this agent: the start waits, reporting nothing."""


class StartRefused(Exception):
    """The domain cannot be started as described (a disk file is missing...); the message is reported."""


@dataclasses.dataclass
class Stopping:
    uid: str
    since: float
    last_request: float = 0.0


@dataclasses.dataclass
class Starts:
    uid: str
    at: float                          # when the agent last started the domain
    quick_stops: int = 0               # stops by the guest itself within RESTART_WINDOW of a start, in a row
    restart_at: float | None = None    # set when the domain is first found gone after that start


class VmFiles:
    """The per-guest directory under ``<state-dir>/vms``."""

    def __init__(self, state_dir: str) -> None:
        self.root = os.path.join(state_dir, "vms")

    def directory(self, uid: str) -> str:
        return os.path.join(self.root, uid)

    def console_log(self, uid: str) -> str:
        return os.path.join(self.directory(uid), "console.log")

    def config_drive(self, uid: str) -> str:
        return os.path.join(self.directory(uid), "config-drive.iso")

    def prepare(self, vm: t.Mapping[str, t.Any], launch: LaunchSpec, domain_name: str,
                user_data: str | bytes | None) -> tuple[str, str]:
        """Create the guest's directory, owner file, console log (rotated when big, with a header line) and
        config drive (with ``user_data``, the launch's or its Secret's); (console log, config drive) paths."""
        meta = vm["metadata"]
        uid = str(meta["uid"])
        directory = self.directory(uid)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        owner = {"namespace": meta.get("namespace"), "name": meta["name"], "uid": uid}
        with open(os.path.join(directory, "owner.json"), "w") as file:
            json.dump(owner, file)
        console = self.console_log(uid)
        try:
            if os.path.getsize(console) > CONSOLE_ROTATE_BYTES:
                os.replace(console, console + ".1")
        except FileNotFoundError:
            pass
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        with open(console, "a") as file:
            file.write(f"\n[cumulo-agent {stamp}] starting domain {domain_name} on host {launch.host}\n")
        drive = self.config_drive(uid)
        write_config_drive(drive, instance_id=uid, hostname=launch.hostname or str(meta["name"]),
                           user_data=user_data, public_keys=launch.ssh_public_keys)
        return console, drive

    def leftovers(self) -> list[tuple[str, dict[str, t.Any] | None, float]]:
        """(uid, owner or None, mtime) of every guest directory."""
        found = []
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        for entry in entries:
            if not entry.is_dir():
                continue
            try:
                with open(os.path.join(entry.path, "owner.json")) as file:
                    owner = json.load(file)
            except (OSError, ValueError):
                owner = None
            try:
                mtime = entry.stat().st_mtime
            except OSError:
                continue
            found.append((entry.name, owner if isinstance(owner, dict) else None, mtime))
        return found

    def remove(self, uid: str) -> None:
        shutil.rmtree(self.directory(uid), ignore_errors=True)


class VmReconciler(ObjectReconciler):
    kind = "VirtualMachine"
    plural = "virtualmachines"
    status_key = "node"

    def __init__(self, agent: t.Any, *, stop_timeout: float = 60.0, shutdown_retry_seconds: float = 3.0,
                 sweep_seconds: float = 30.0, janitor_seconds: float = 300.0,
                 full_resync_seconds: float = FULL_RESYNC_SECONDS, **kwargs: t.Any) -> None:
        super().__init__(agent, **kwargs)
        self.full_resync_seconds = full_resync_seconds
        self.stop_timeout = stop_timeout
        self.shutdown_retry_seconds = shutdown_retry_seconds
        self.sweep_seconds = sweep_seconds
        self.janitor_seconds = janitor_seconds
        self.files = VmFiles(agent.config.state_dir)
        self._stopping: dict[str, Stopping] = {}
        self._starts: dict[str, Starts] = {}
        self._detaching: dict[tuple[str, str], float] = {}
        self._adopted: set[str] = set()
        self._enforced: set[str] = set()  # uids whose security groups this process applied
        self._segments: dict[str, dict[str, Segment]] = {}  # host -> bridge -> segment ensured by this process
        self._enforcers: dict[str, SecurityGroupEnforcer] = {}
        self._unused: dict[str, set[str]] = {}  # host -> bridges no guest wanted at the last sweep
        self._released: set[str] = set()  # uids of stopped guests whose rules and segments were released
        self._sweep_wake = asyncio.Event()
        self.swept = asyncio.Event()  # the first sweep is done (tests, readiness)

    # -- events ----------------------------------------------------------------------------------

    def on_event(self, kind: str, key: str, old: dict[str, t.Any] | None, new: dict[str, t.Any] | None) -> None:
        if kind == "DELETED":
            self._sweep_wake.set()  # a domain of it, if any, is a suspect now

    def _forget(self, key: str) -> None:
        stopping = self._stopping.pop(key, None)
        starts = self._starts.get(key)
        for uid in {entry.uid for entry in (stopping, starts) if entry is not None}:
            self._released.discard(uid)
        self._starts.pop(key, None)
        self._adopted.discard(key)
        for entry in [entry for entry in self._detaching if entry[0] == key]:
            del self._detaching[entry]
        self.queue.forget(key)
        self.forget_states(key)

    # -- reconcile -------------------------------------------------------------------------------

    async def reconcile(self, key: str, vm: dict[str, t.Any] | None) -> float | None:
        if vm is None:
            self._forget(key)
            return None
        try:
            launch = vmspec.launch_of(vm)
        except pydantic.ValidationError as error:
            self.transition(key, "launch", "invalid", logging.ERROR, "status.launch cannot be read",
                            error=str(error).splitlines()[0])
            return None
        uid = str(vm["metadata"]["uid"])
        worker = self.worker(launch.host if launch is not None else None)
        if launch is None or worker is None:
            # Bound to this agent by its label but not (or no longer) placed here (being placed, or stopped a
            # moment ago): a domain of it here, if any, is for the sweep to judge (with a direct GET).
            labelled = self.worker(self.bound_host(vm))
            if labelled is not None:
                try:
                    if await labelled.hypervisor.domain(uid) is not None:
                        self._sweep_wake.set()
                except HypervisorError:
                    pass  # the periodic sweep looks again
            return None
        hypervisor = worker.hypervisor
        message, delay = "", None
        domain: Domain | None
        try:
            domain = await hypervisor.domain(uid)
            if not vmspec.migrating(vm) and vmspec.wants_running(launch) and \
                    (domain is None or not domain.active):
                held = await self._fencing_holds(key, uid, launch, worker)
                if held is not None:
                    if not held:
                        return None  # placed elsewhere now: not ours to start nor to report on
                    fenced = worker.storage_heartbeat.fenced
                    await self.report(key, vm, vmspec.domain_report(
                        launch.host, None, console_log=None,
                        message="the host fenced itself (neither its Lease nor its storage heartbeat could be "
                        "written): HA guests are not started until its Lease renews" if fenced else
                        "the start waits until the API confirms the guest is still placed here"))
                    return FENCED_RETRY
            if vmspec.migrating(vm):
                # A live migration moves the domain (hostagent.migrations): neither start nor stop it meanwhile.
                pass
            elif vmspec.wants_running(launch):
                self._stopping.pop(key, None)
                self._released.discard(uid)
                try:
                    domain, delay, message = await self._run(key, vm, launch, worker, domain)
                except DisksPending:
                    return None  # nothing to report: no domain, no failure

            else:
                self._starts.pop(key, None)
                domain, delay = await self._stop(key, uid, hypervisor, domain)
                if domain is None and uid not in self._released:
                    await self._network_released(worker, uid, launch)
                    self._released.add(uid)
            self.queue.forget(key)
        except (HypervisorError, StartRefused, NetworkError, SecurityGroupError, OSError) as error:
            message = str(error)
            self.transition(key, "error", message, logging.WARNING, "domain operation failed", error=message)
            delay = self.queue.backoff(key)
            try:
                domain = await hypervisor.domain(uid)
            except HypervisorError:
                # The hypervisor does not answer: the domain's state is unknown, never "shutoff" (the
                # controller would take the guest for stopped and release its placement).
                domain = Domain(uuid=uid, name="", state=DomainState.UNKNOWN)
        else:
            self._states.pop((key, "error"), None)
        console = self.files.console_log(uid) if hypervisor.local_files else None
        if console is not None and not os.path.exists(console):
            console = None  # never started on this host yet
        await self.report(key, vm, vmspec.domain_report(launch.host, domain, console_log=console, message=message))
        return delay

    # -- fencing (hostagent.storageheartbeat) -----------------------------------------------------

    @staticmethod
    def _fenceable(launch: LaunchSpec) -> bool:
        """An HA guest on shared storage: the controller restarts it elsewhere once its host is Down."""
        return launch.ha_enabled and all(disk.pool_type != "Filesystem" for disk in launch.disks)

    async def _fencing_holds(self, key: str, uid: str, launch: LaunchSpec, worker: HostWorker) -> bool | None:
        """Before starting a domain on a host that fenced itself or whose Lease expired: True while still fenced
        (an HA guest waits); False when a direct GET shows the guest placed elsewhere (restarted there meanwhile);
        None: go ahead."""
        fencing = getattr(worker, "storage_heartbeat", None)  # None: a worker without one (unit tests' fakes)
        if fencing is None:
            return None
        if fencing.fenced and self._fenceable(launch):
            return True
        heartbeat = getattr(worker, "heartbeat", None)
        if not fencing.confirm_starts and not (heartbeat is not None and heartbeat.lapsed()):
            return None
        # Fenced once, or the Lease expired (the agent paused or was cut off, unable to fence): the controller may
        # have restarted the guest elsewhere meanwhile and the cache may not show it yet.
        try:
            live = await self.get_live(key)
        except KubeError:
            return True  # cannot confirm: wait, never start a guest that may run elsewhere
        if live is None or str(live["metadata"].get("uid")) != uid or vmspec.placed_host(live) != launch.host:
            log.warning("not starting a guest placed elsewhere since this host fenced itself", extra={
                "object": key, "host": launch.host, "placed": vmspec.placed_host(live)})
            return False
        return None

    async def fence(self, worker: HostWorker) -> None:
        """Destroy the domains of the host's HA guests on shared storage (the host fenced itself): the controller
        may restart them elsewhere, and they must not run twice. Disks are untouched."""
        for vm in list(self.informer.cache.values()):
            try:
                launch = vmspec.launch_of(vm)
            except pydantic.ValidationError:
                continue
            if launch is None or launch.host != worker.name or not self._fenceable(launch):
                continue
            uid = str(vm["metadata"]["uid"])
            try:
                if await worker.hypervisor.domain(uid) is not None:
                    await worker.hypervisor.destroy(uid)
                    log.error("fenced: HA guest's domain destroyed", extra={
                        "object": f"{vm['metadata'].get('namespace')}/{vm['metadata']['name']}", "uuid": uid,
                        "host": worker.name})
            except HypervisorError as error:
                log.error("fencing: cannot destroy a domain", extra={"uuid": uid, "error": str(error)})

    async def _run(self, key: str, vm: dict[str, t.Any], launch: LaunchSpec, worker: HostWorker,
                   domain: Domain | None) -> tuple[Domain | None, float | None, str]:
        hypervisor = worker.hypervisor
        uid = str(vm["metadata"]["uid"])
        if domain is not None and domain.state == DomainState.STOPPING:
            return domain, STOPPING_POLL, ""  # a shutdown asked for earlier finishes first; then it starts again
        if domain is not None and not domain.active:
            await hypervisor.destroy(uid)  # crashed: clear it away before starting afresh
            domain = None
        if domain is None:
            wait, message = self._restart_delay(key, uid)
            if wait > 0:
                return None, wait, message
            await self._ensure_segments(worker, launch)
            pending = self.agent.volumes.disks_pending(key.partition("/")[0], launch.disks)
            if pending:
                # The launch comes with the placement; this agent is still creating a disk of it. Its report
                # requeues the guest (VolumeReconciler.wake_guest); the controller shows the disk's progress.
                self.transition(key, "start", "waiting", logging.INFO, "waiting for disks before starting",
                                volumes=pending)
                raise DisksPending()
            self.transition(key, "start", "starting", logging.DEBUG, "starting")
            domain = await self._start(key, vm, launch, worker)
            await self._security_groups(worker, uid, launch)
            return domain, None, ""
        if key not in self._adopted:
            await self._ensure_segments(worker, launch)  # an agent restart: make sure the plumbing is all there
            self._adopted.add(key)
            if key not in self._starts:
                log.info("adopted running domain", extra={"object": key, "domain": domain.name, "uuid": uid})
        await self._security_groups(worker, uid, launch)
        return await self._converge_disks(key, launch, hypervisor, domain)

    # -- networking ------------------------------------------------------------------------------

    async def _ensure_segments(self, worker: HostWorker, launch: LaunchSpec) -> None:
        ensured = self._segments.setdefault(worker.name, {})
        for nic in launch.nics:
            segment = nic.segment()
            try:
                await worker.network.ensure_segment(segment)
            except NetworkError as error:
                raise NetworkError(f"NIC {nic.device_id} ({nic.network}): {error}") from None
            ensured[segment.bridge] = segment

    def enforcer(self, worker: HostWorker) -> SecurityGroupEnforcer:
        enforcer = self._enforcers.get(worker.name)
        if enforcer is None:
            enforcer = self._enforcers[worker.name] = SecurityGroupEnforcer(
                SubprocessExecutor(concurrency=2), self.agent.config.state_dir, self.agent.config.host_netns)
        return enforcer

    async def _security_groups(self, worker: HostWorker, uid: str, launch: LaunchSpec) -> None:
        """Enforce the launch's security groups on the host (no-op when they did not change). Open vSwitch
        segments filter in the switch, not here."""
        if isinstance(worker.network, SimulatorNetworkDriver):
            return  # a simulated host: nothing to filter
        nics = guest_nics(uid, [nic for nic in launch.nics if nic.vswitch == "linuxbridge"], vmspec.nic_port)
        if nics or uid in self._enforced or self.enforcer(worker).has_guest(uid):
            changed = await self.enforcer(worker).set_guest(uid, nics)
            if changed:
                log.info("security groups applied", extra={"uuid": uid, "host": worker.name, "nics": len(nics)})
            if nics:
                self._enforced.add(uid)
            else:
                self._enforced.discard(uid)

    async def _network_released(self, worker: HostWorker, uid: str, launch: LaunchSpec | None) -> None:
        """After a guest is gone: its rules, and the segments no other running guest of the host uses."""
        if isinstance(worker.network, SimulatorNetworkDriver):
            return
        enforcer = self.enforcer(worker)
        if uid in self._enforced or enforcer.has_guest(uid):
            await enforcer.remove_guest(uid)
            self._enforced.discard(uid)
        if launch is not None:
            ensured = self._segments.setdefault(worker.name, {})
            for nic in launch.nics:
                ensured.setdefault(nic.segment().bridge, nic.segment())
            await self._release_unused(worker, exclude=uid, only={nic.bridge for nic in launch.nics})

    def _wanted_bridges(self, host: str, exclude: str | None = None) -> set[str]:
        wanted = set()
        for vm in self.informer.cache.values():
            if str(vm["metadata"].get("uid")) == exclude:
                continue
            try:
                launch = vmspec.launch_of(vm)
            except pydantic.ValidationError:
                continue
            if launch is not None and launch.host == host and vmspec.wants_running(launch):
                wanted.update(nic.bridge for nic in launch.nics)
        return wanted

    async def _release_unused(self, worker: HostWorker, exclude: str | None = None, only: set[str] | None = None,
                              settle: bool = False) -> None:
        """Release the tracked segments (``only`` these bridges, when given) no running guest of the host wants;
        the driver keeps those that still have ports. ``settle`` (the periodic sweep): only segments already
        unused at the previous sweep, so one that something (a router) ensured a moment ago and has not plugged
        into yet is left alone."""
        ensured = self._segments.get(worker.name, {})
        wanted = self._wanted_bridges(worker.name, exclude)
        candidates = {bridge for bridge in ensured if bridge not in wanted and (only is None or bridge in only)}
        if settle:
            previous = self._unused.get(worker.name, set())
            self._unused[worker.name] = candidates
            candidates = candidates & previous  # a new set: the one just recorded stays whole
        for bridge in sorted(candidates):
            segment = ensured[bridge]
            try:
                await worker.network.release_segment(segment)
            except NetworkError as error:
                log.warning("cannot release a segment", extra={"host": worker.name, "bridge": bridge,
                                                               "error": str(error)})
                continue
            ensured.pop(bridge, None)

    def _restart_delay(self, key: str, uid: str) -> tuple[float, str]:
        """A guest that keeps stopping right after its start is not restarted in a loop: the first time its
        domain is found gone, a quick stop (within RESTART_WINDOW of the start) sets a delay, doubling with
        each quick stop in a row."""
        starts = self._starts.get(key)
        if starts is None or starts.uid != uid:
            return 0.0, ""
        now = time.monotonic()
        if starts.restart_at is None:
            starts.quick_stops = starts.quick_stops + 1 if now - starts.at <= RESTART_WINDOW else 0
            delay = min(RESTART_MAX_DELAY, 5.0 * 2 ** (starts.quick_stops - 1)) if starts.quick_stops else 0.0
            starts.restart_at = now + delay
            log.info("the guest stopped by itself; starting it again", extra={
                "object": key, "uuid": uid, "ran_seconds": round(now - starts.at, 1), "delay": delay})
        remaining = starts.restart_at - now
        if remaining > 0:
            return remaining, "the guest stopped by itself soon after starting; starting it again with backoff"
        return 0.0, ""

    async def _start(self, key: str, vm: dict[str, t.Any], launch: LaunchSpec, worker: HostWorker) -> Domain:
        hypervisor = worker.hypervisor
        uid = str(vm["metadata"]["uid"])
        name = vmspec.domain_name(str(vm["metadata"].get("namespace", "")), str(vm["metadata"]["name"]), uid)
        console = drive = None
        user_data, secret_note = await self._user_data(vm, launch)
        await self._ceph_secrets(launch.disks, hypervisor)
        if hypervisor.local_files:
            for disk in launch.disks:
                if disk.rbd is None and not os.path.exists(disk.path):
                    raise StartRefused(f"disk {disk.path} of volume {disk.volume} does not exist")
            for path in (launch.kernel_path, launch.initrd_path):
                if path and not os.path.exists(path):
                    raise StartRefused(f"boot file {path} does not exist")
            console, drive = await asyncio.to_thread(self.files.prepare, vm, launch, name, user_data)
        description = vmspec.describe(vm, launch, console_log=console, config_drive=drive,
                                      host_mhz=worker.facts.cpu_speed_mhz if worker.facts else None,
                                      started_at=datetime.datetime.now(datetime.timezone.utc))
        previous = self._starts.get(key)
        started = time.monotonic()
        domain = await hypervisor.start(description)
        self._starts[key] = Starts(uid, started, previous.quick_stops if previous and previous.uid == uid else 0)
        self._adopted.add(key)
        log.info("domain started", extra={"object": key, "domain": domain.name, "uuid": uid, "host": launch.host,
                                          "seconds": round(time.monotonic() - started, 2), **secret_note})
        return domain

    async def _ceph_secrets(self, disks: t.Iterable[t.Any], hypervisor: HypervisorDriver) -> None:
        """Define the libvirt secret of each Ceph client the RBD disks use (key read from the pool's Secret)
        before a domain that names it starts or gets the disk; a missing or unreadable key refuses the start."""
        rbd_pools = self.agent.rbd_pools
        done: set[str] = set()
        for disk in disks:
            rbd = getattr(disk, "rbd", None)
            if rbd is None:
                continue
            secret_uuid = vmspec.libvirt_secret_uuid(rbd.monitors, rbd.user)
            if secret_uuid in done:
                continue
            done.add(secret_uuid)
            if rbd_pools is None:  # a simulated host: its hypervisor keeps the secret, with no key to read
                await hypervisor.define_secret(secret_uuid, f"cumulo client.{rbd.user} {secret_uuid}", b"")
                continue
            try:
                key = await rbd_pools.key(rbd.model_dump(by_alias=True, mode="json"))
            except StorageError as error:
                raise StartRefused(f"RBD disk {disk.volume}: {error}") from None
            try:
                value = base64.b64decode(key, validate=True)
            except (binascii.Error, ValueError):
                raise StartRefused(f"RBD disk {disk.volume}: the Ceph key is not valid base64") from None
            await hypervisor.define_secret(secret_uuid, f"cumulo client.{rbd.user} {secret_uuid}", value)

    async def _user_data(self, vm: t.Mapping[str, t.Any], launch: LaunchSpec) -> tuple[str | bytes | None, dict]:
        """The user data for the config drive: the launch's inline text, or its Secret's key read now; and what
        may be logged of it (the Secret's name and the content's sha256, never the content)."""
        ref = launch.user_data_secret
        if ref is None:
            return launch.user_data, {}
        content = await self.read_user_data_secret(str(vm["metadata"].get("namespace", "")), ref)
        return content, {"user_data_secret": f"{ref.namespace}/{ref.name}",
                         "user_data_sha256": hashlib.sha256(content).hexdigest()}

    async def read_user_data_secret(self, namespace: str, ref: SecretKeyReference) -> bytes:
        """The bytes of the Secret's key (gzip user data stays binary). Raises StartRefused with a message fit
        for status: it names the Secret and the key, and carries nothing of the Secret's data."""
        where = f"user data Secret {ref.namespace}/{ref.name}"
        if ref.namespace != namespace:
            # The controller writes the guest's own namespace; anything else is not this guest's to read.
            raise StartRefused(f"{where} is not in the guest's namespace {namespace}")
        try:
            secret = await self.agent.api.request(
                "GET", resource_path("", "v1", "secrets", ref.name, namespace=ref.namespace))
        except KubeError as error:
            if error.status == 404:
                raise StartRefused(f"{where} does not exist") from None
            if error.status == 403:
                raise StartRefused(f"{where} cannot be read by the agent: {error.message}") from None
            raise StartRefused(f"{where} cannot be read: {error.reason or error.status}") from None
        encoded = (secret.get("data") or {}).get(ref.key)
        if encoded is None:
            raise StartRefused(f"{where} has no key '{ref.key}'")
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise StartRefused(f"{where}: key '{ref.key}' is not valid base64") from None

    async def _converge_disks(self, key: str, launch: LaunchSpec, hypervisor: HypervisorDriver,
                              domain: Domain) -> tuple[Domain | None, float | None, str]:
        changes = vmspec.disk_changes(launch, domain.disks)
        present = {disk.volume for disk in domain.disks if disk.volume}
        for entry in [entry for entry in self._detaching if entry[0] == key and entry[1] not in present]:
            del self._detaching[entry]
        if not changes:
            return domain, None, ""
        now = time.monotonic()
        attaching = {disk.volume for disk in changes.attach}
        try:
            await self._ceph_secrets([disk for disk in launch.disks if disk.volume in attaching], hypervisor)
        except StartRefused as error:
            raise HypervisorError(str(error)) from None
        for disk in changes.attach:
            try:
                await hypervisor.attach_disk(domain.uuid, disk)
            except HypervisorError as error:
                raise HypervisorError(f"attaching volume {disk.volume}: {error}") from None
            log.info("disk attached", extra={"object": key, "volume": disk.volume, "target": disk.target})
        for disk in changes.detach:
            asked = self._detaching.get((key, disk.volume))
            if asked is not None and now - asked < DETACH_RETRY_SECONDS:
                continue
            try:
                await hypervisor.detach_disk(domain.uuid, disk)
            except HypervisorError as error:
                raise HypervisorError(f"detaching volume {disk.volume}: {error}") from None
            self._detaching[(key, disk.volume)] = now
            log.info("disk detach requested", extra={"object": key, "volume": disk.volume, "target": disk.target})
        domain = await hypervisor.domain(domain.uuid)
        pending = domain is not None and any(disk.volume in {d.volume for d in changes.detach} for disk in domain.disks)
        return domain, 1.0 if pending else None, ""

    async def _stop(self, key: str, uid: str, hypervisor: HypervisorDriver,
                    domain: Domain | None) -> tuple[Domain | None, float | None]:
        if domain is None or not domain.active:
            if domain is not None:
                await hypervisor.destroy(uid)
                domain = None
            if self._stopping.pop(key, None) is not None:
                log.info("domain stopped", extra={"object": key, "uuid": uid})
            return None, None
        now = time.monotonic()
        stopping = self._stopping.get(key)
        if stopping is None or stopping.uid != uid:
            stopping = self._stopping[key] = Stopping(uid, now)
        if now - stopping.since >= self.stop_timeout:
            log.warning("the guest did not power off after ACPI shutdown requests; destroying the domain",
                        extra={"object": key, "uuid": uid, "timeout": self.stop_timeout})
            await hypervisor.destroy(uid)
            self._stopping.pop(key, None)
            return await hypervisor.domain(uid), None
        if now - stopping.last_request >= self.shutdown_retry_seconds:
            await hypervisor.shutdown(uid)
            if not stopping.last_request:
                log.info("domain shutdown requested (ACPI)", extra={"object": key, "uuid": uid})
            stopping.last_request = now
        domain = await hypervisor.domain(uid)
        if domain is None or not domain.active:
            return await self._stop(key, uid, hypervisor, domain)
        return domain, STOPPING_POLL

    # -- resync: one listing of the domains, a reconcile only where they differ ----------------------

    async def _resync(self) -> None:
        """Every ``resync_seconds``: list each hypervisor's domains once and queue only the guests whose domain
        is out of step with their report or launch (one that powered itself off, crashed, or was destroyed
        behind the agent's back), as CloudStack's agent sends one VM state report per ping. Every guest is
        reconciled only every ``full_resync_seconds`` (the level-based safety net). Queuing every guest every
        10 s (and every sweep) was a hypervisor lookup and a reconcile per guest: 1,300 a second across the
        agents at 10,000 guests, where one listing per host does."""
        await self.informer.synced.wait()
        next_full = time.monotonic() + self.full_resync_seconds * random.uniform(0.5, 1.0)
        while True:
            await asyncio.sleep(self.resync_seconds * random.uniform(0.9, 1.1))
            if time.monotonic() < next_full:
                await self.check_states()
                continue
            next_full = time.monotonic() + self.full_resync_seconds * random.uniform(0.9, 1.1)
            for key in list(self.informer.cache):
                self.queue.add(key, random.uniform(0, min(self.resync_seconds / 2, 5.0)))

    async def check_states(self) -> None:
        """Queue the guests placed on this agent's hosts whose domains are out of step (:func:`vmspec.out_of_step`).
        One waiting out a backoff (a failing start) is brought forward: a failure is retried at least this often."""
        # A hypervisor may serve several simulated hosts: its one listing covers all of them.
        served: dict[int, tuple[HypervisorDriver, list[str]]] = {}
        for name, worker in self.agent.workers.items():
            served.setdefault(id(worker.hypervisor), (worker.hypervisor, []))[1].append(name)
        domains: dict[str, Domain] = {}
        listed: set[str] = set()
        for hypervisor, hosts in served.values():
            try:
                found = await hypervisor.domains()
            except HypervisorError:
                continue  # the sweep says so; the next round looks again
            listed.update(hosts)
            domains.update((domain.uuid, domain) for domain in found)
        for key, vm in list(self.informer.cache.items()):
            host = vmspec.placed_host(vm)
            if host not in listed or host not in self.hosts:
                continue
            if vmspec.out_of_step(vm, domains.get(str(vm["metadata"]["uid"])), self.last_report(key, vm)):
                self.queue.add(key)

    # -- sweep: adoption and orphans -----------------------------------------------------------

    def background(self) -> list[t.Coroutine[t.Any, t.Any, None]]:
        self._last_janitor = -self.janitor_seconds
        return [self.sweep_loop(self._sweep_and_janitor, seconds=self.sweep_seconds, wake=self._sweep_wake,
                                swept=self.swept, what="domain sweep")]

    async def _sweep_and_janitor(self) -> None:
        await self.sweep()
        if time.monotonic() - self._last_janitor >= self.janitor_seconds:
            self._last_janitor = time.monotonic()
            await self.janitor()

    def _hypervisors(self) -> list[tuple[str, HypervisorDriver]]:
        seen: dict[int, tuple[str, HypervisorDriver]] = {}
        for name, worker in self.agent.workers.items():
            seen.setdefault(id(worker.hypervisor), (name, worker.hypervisor))
        return list(seen.values())

    def _vms_by_uid(self) -> dict[str, dict[str, t.Any]]:
        return {str(vm["metadata"]["uid"]): vm for vm in self.informer.cache.values()
                if self.bound_host(vm) is not None}

    async def sweep(self) -> None:
        """Adopt the domains the cache places here; destroy the confirmed orphans."""
        vms = self._vms_by_uid()
        for host, hypervisor in self._hypervisors():
            try:
                domains = await hypervisor.domains()
            except HypervisorError as error:
                self.transition("", f"sweep {host}", str(error), logging.WARNING, "cannot list domains",
                                error=str(error))
                continue
            self._states.pop(("", f"sweep {host}"), None)
            plan = vmspec.sweep_plan(domains, vms, self.hosts)
            if not self.swept.is_set():
                # Only the first sweep adopts every guest found running; then the state check queues those
                # whose domain goes out of step (check_states).
                for key, _domain in plan.adopt:
                    self.queue.add(key)
            for domain in plan.suspects:
                await self._judge(hypervisor, domain)
        await self._network_sweep()

    async def _network_sweep(self) -> None:
        """Rules of guests that no longer run (deleted while running, destroyed by the sweep) and segments no
        running guest uses."""
        for name, worker in self.agent.workers.items():
            if isinstance(worker.network, SimulatorNetworkDriver):
                continue
            try:
                live = {domain.uuid for domain in await worker.hypervisor.domains()}
                enforcer = self.enforcer(worker)
                for uid in await enforcer.guests() - live:
                    await enforcer.remove_guest(uid)
                    self._enforced.discard(uid)
                    log.info("security groups of a gone guest removed", extra={"uuid": uid, "host": name})
                present = getattr(worker.network, "segments", None)
                if present is not None:  # segments left by guests gone while the agent was down, too
                    ensured = self._segments.setdefault(name, {})
                    for segment in await present():
                        ensured.setdefault(segment.bridge, segment)
                await self._release_unused(worker, settle=True)
            except (HypervisorError, SecurityGroupError, NetworkError, OSError) as error:
                log.warning("network sweep failed", extra={"host": name, "error": str(error)})

    async def _judge(self, hypervisor: HypervisorDriver, domain: Domain) -> None:
        owner = domain.owner
        assert owner is not None
        try:
            vm = await self.get_live(owner.key)
        except KubeError as error:
            self.transition(owner.key, "judge", "unconfirmed", logging.INFO,
                            "cannot confirm a domain's VirtualMachine; leaving the domain alone",
                            error=error.message)
            return
        verdict, why = vmspec.domain_verdict(owner, vm)
        if verdict == vmspec.Verdict.DESTROY:
            log.warning("destroying a domain that is not placed here", extra={
                "object": owner.key, "domain": domain.name, "uuid": domain.uuid, "reason": why})
            try:
                await hypervisor.destroy(domain.uuid)
            except HypervisorError as error:
                log.warning("cannot destroy an orphaned domain", extra={"uuid": domain.uuid, "error": str(error)})
        else:
            self.queue.add(owner.key)  # the cache lags; its reconcile takes over when it catches up

    async def janitor(self) -> None:
        """Remove the files of guests whose VirtualMachine is confirmed gone."""
        if not any(hypervisor.local_files for _, hypervisor in self._hypervisors()):
            return
        live: set[str] = set()
        for _, hypervisor in self._hypervisors():
            live.update(domain.uuid for domain in await hypervisor.domains())
        known = {str(vm["metadata"]["uid"]) for vm in self.informer.cache.values()}
        for uid, owner, mtime in await asyncio.to_thread(self.files.leftovers):
            if uid in live or uid in known or time.time() - mtime < 60:
                continue
            if owner is None or not owner.get("name"):
                continue  # not ours to judge
            key = f"{owner.get('namespace', '')}/{owner['name']}"
            try:
                vm = await self.get_live(key)
            except KubeError:
                continue
            if vm is None or vm["metadata"].get("uid") != uid:
                log.info("removing the files of a deleted guest", extra={"object": key, "uid": uid})
                await asyncio.to_thread(self.files.remove, uid)
