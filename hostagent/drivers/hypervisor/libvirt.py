"""The libvirt hypervisor driver: a real libvirtd running QEMU guests (TCG ``qemu`` or ``kvm``).

libvirt-python calls block, so they run in one dedicated thread: calls on one connection are
serialised anyway, and a hung libvirtd then holds one thread, not the event loop. A call that
outlives its deadline is reported as an error and no further call is queued behind it until it
returns (no pile-up of stuck threads).

The virt type is configuration, never read from libvirt: libvirt advertises ``kvm`` whenever
/dev/kvm exists, even where KVM guests cannot run (nested virtualisation without vmx/svm).

Domains are transient (``createXML``), rendered by :mod:`.domainxml`; "not found" is an answer (None, or
nothing to do), not an error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import logging
import os
import typing as t
import xml.etree.ElementTree as ET
from xml.sax.saxutils import quoteattr

import libvirt

from controllers.api.v1alpha1.common import HypervisorType

from ..network import NetworkDriver, NetworkError
from . import (DiskDevice, Domain, DomainDescription, DomainState, HostFacts, HypervisorError, MigrationTarget,
               domainxml, version_string)

log = logging.getLogger(__name__)

DEFAULT_URI = "qemu:///system"
VIRT_TYPES = ("qemu", "kvm")


def _ignore_libvirt_errors(_context: object, _error: object) -> None:
    """libvirt prints every error on stderr by default; the agent reports them itself."""


libvirt.registerErrorHandler(_ignore_libvirt_errors, None)


def parse_capabilities(xml: str) -> dict[str, t.Any]:
    """The parts of ``virConnectGetCapabilities`` the agent uses: host CPU model and arch, and the
    domain types libvirt offers per guest architecture."""
    root = ET.fromstring(xml)
    cpu = root.find("host/cpu")
    topology = cpu.find("topology") if cpu is not None else None
    domain_types: dict[str, set[str]] = {}
    for guest in root.findall("guest"):
        arch = guest.find("arch")
        if arch is None:
            continue
        kinds = domain_types.setdefault(arch.get("name", ""), set())
        kinds.update(domain.get("type", "") for domain in arch.findall("domain"))
    counter = cpu.find("counter[@name='tsc']") if cpu is not None else None
    return {
        "cpu_model": cpu.findtext("model") if cpu is not None else None,
        "tsc_mhz": int(counter.get("frequency", 0)) // 1_000_000 if counter is not None else None,
        "architecture": cpu.findtext("arch") if cpu is not None else None,
        "sockets": int(topology.get("sockets", 0)) if topology is not None else None,
        "domain_types": domain_types,
    }


STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: DomainState.UNKNOWN,
    libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: DomainState.RUNNING,  # idle, waiting for I/O
    libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: DomainState.STOPPING,
    libvirt.VIR_DOMAIN_SHUTOFF: DomainState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: DomainState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: DomainState.SUSPENDED,
}
GONE = (libvirt.VIR_ERR_NO_DOMAIN,)
# Asking a domain that is already off (or on its way) to stop, or a disk that is already going to go.
ALREADY = (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID)
DETACH_DONE = (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_DEVICE_MISSING,
               getattr(libvirt, "VIR_ERR_OPERATION_IN_PROGRESS", -1))


def _lookup(connection: libvirt.virConnect, uuid: str) -> libvirt.virDomain | None:
    try:
        return connection.lookupByUUIDString(uuid)
    except libvirt.libvirtError as error:
        if error.get_error_code() in GONE:
            return None
        raise


def _describe(domain: libvirt.virDomain) -> Domain:
    state, _reason = domain.state()
    owner, disks, console = domainxml.parse(domain.XMLDesc(0))
    name = STATES.get(state, DomainState.UNKNOWN)
    return Domain(uuid=domain.UUIDString(), name=domain.name(), state=name, owner=owner, disks=disks,
                  console_log=console, id=domain.ID() if domain.isActive() else None)


def domainxml_disks(xml: str) -> dict[str, str]:
    """Target device -> source file of a domain's file-backed disks (cdroms included)."""
    found = {}
    for disk in ET.fromstring(xml).iterfind("devices/disk"):
        source, target = disk.find("source"), disk.find("target")
        if target is not None and target.get("dev"):
            found[target.get("dev")] = source.get("file", "") if source is not None else ""
    return found


def _since(seconds_ago: float) -> str:
    moment = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=seconds_ago)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class LibvirtDriver:
    """The hypervisor of a host run by libvirtd at ``uri``."""

    hypervisor_type = HypervisorType.KVM
    local_files = True

    def __init__(self, uri: str = DEFAULT_URI, virt_type: str = "qemu", *, call_timeout: float = 30.0,
                 network: NetworkDriver | None = None) -> None:
        if virt_type not in VIRT_TYPES:
            raise ValueError(f"virt type must be one of {', '.join(VIRT_TYPES)}, not {virt_type!r}")
        self.uri = uri
        self.virt_type = virt_type
        self.call_timeout = call_timeout
        self.network = network  # plugs the taps of Open vSwitch NICs (libvirt plugs Linux bridge ones itself)
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="libvirt")
        self._connection: libvirt.virConnect | None = None
        self._hung: tuple[concurrent.futures.Future[t.Any], str, str] | None = None

    # -- plumbing ------------------------------------------------------------------------------

    def _connect(self) -> libvirt.virConnect:
        """The open connection, (re)opened if libvirtd went away. Runs in the libvirt thread."""
        connection = self._connection
        if connection is not None:
            try:
                if connection.isAlive():
                    return connection
            except libvirt.libvirtError:
                pass
            self._drop_connection()
        try:
            connection = libvirt.open(self.uri)
        except libvirt.libvirtError as error:
            raise HypervisorError(f"cannot connect to libvirt at {self.uri}: {error}") from None
        self._connection = connection
        log.info("connected to libvirtd", extra={"uri": self.uri, "libvirt_host": connection.getHostname()})
        return connection

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except libvirt.libvirtError:
                pass

    def _run(self, what: str, function: t.Callable[[libvirt.virConnect], t.Any]) -> t.Any:
        connection = self._connect()
        try:
            return function(connection)
        except libvirt.libvirtError as error:
            # The next call reconnects if the connection broke; a live one is kept.
            if not connection.isAlive():
                self._drop_connection()
            raise HypervisorError(f"libvirt {what} failed: {error}") from None

    async def _call(self, what: str, function: t.Callable[[libvirt.virConnect], t.Any]) -> t.Any:
        if self._hung is not None:
            future, hung_what, since = self._hung
            if not future.done():
                # A fixed time, not a growing duration: the message must not change every round,
                # or each round would be a status write.
                raise HypervisorError(f"libvirt {hung_what} has not returned since {since} "
                                      f"(libvirtd at {self.uri} hangs)")
            self._hung = None
        future = self._thread.submit(self._run, what, function)
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.call_timeout)
        except TimeoutError:
            self._hung = (future, what, _since(self.call_timeout))
            raise HypervisorError(f"libvirt {what} did not return within {self.call_timeout:g}s") from None

    # -- HypervisorDriver ------------------------------------------------------------------------

    async def host_facts(self) -> HostFacts:
        def gather(connection: libvirt.virConnect) -> HostFacts:
            arch, memory_mib, cpus, mhz, nodes, sockets, _cores, _threads = connection.getInfo()
            capabilities = parse_capabilities(connection.getCapabilities())
            try:
                # getInfo sums the NUMA cells' memory, which can miss memory outside them;
                # the node's own total (MemTotal) is what guests can share.
                total_kib = connection.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)["total"]
                memory_mib = int(total_kib) // 1024
            except (libvirt.libvirtError, KeyError):
                pass
            arch = capabilities["architecture"] or arch
            offered = capabilities["domain_types"].get(arch, set())
            if self.virt_type not in offered:
                hint = "" if offered else f"; is QEMU for {arch} installed?"
                raise HypervisorError(f"libvirt offers no {self.virt_type!r} guests for {arch} "
                                      f"(offered: {', '.join(sorted(offered)) or 'none'}){hint}")
            return HostFacts(
                hypervisor_type=HypervisorType.KVM,
                hypervisor_version=version_string(connection.getVersion()),
                libvirt_version=version_string(connection.getLibVersion()),
                virt_type=self.virt_type,
                cpu_model=capabilities["cpu_model"],
                cpu_sockets=nodes * sockets,
                cpu_cores=cpus,
                # getInfo's MHz is cpu0's current clock, which moves with frequency scaling (and
                # would make every round a status write); the TSC rate is the nominal speed.
                cpu_speed_mhz=capabilities["tsc_mhz"] or mhz,
                memory_mib=memory_mib,
                architecture=arch,
            )

        result: HostFacts = await self._call("host facts", gather)
        return result

    async def start(self, description: DomainDescription) -> Domain:
        xml = domainxml.render(description, self.virt_type)

        def create(connection: libvirt.virConnect) -> Domain:
            existing = _lookup(connection, description.uuid)
            if existing is not None and existing.isActive():
                return _describe(existing)  # started by an earlier call that timed out on our side
            return _describe(connection.createXML(xml, 0))

        await self._plug(description, prepare=True)
        result: Domain = await self._call("start", create)
        try:
            await self._plug(description)
        except HypervisorError:
            with contextlib.suppress(HypervisorError):
                await self.destroy(description.uuid)  # a guest must not run cut off from its network
            raise
        return result

    async def _plug(self, description: DomainDescription, prepare: bool = False) -> None:
        """Taps libvirt leaves unplugged (:data:`domainxml.AGENT_PLUGGED`: Open vSwitch) go into their segment
        through the network driver: recorded before the start where the driver can (``prepare_port``: the
        switch opens the tap the moment libvirt makes it, and the record outlives an agent crash), checked
        after it (``plug`` is idempotent)."""
        for nic in description.nics:
            if nic.segment.vswitch not in domainxml.AGENT_PLUGGED:
                continue
            if self.network is None:
                raise HypervisorError(f"NIC {nic.device_id}: a {nic.segment.vswitch} segment needs the agent's "
                                      "network driver to plug the guest's tap")
            step = getattr(self.network, "prepare_port", None) if prepare else self.network.plug
            if step is None:
                continue
            try:
                await step(nic.segment, nic.port)
            except NetworkError as error:
                raise HypervisorError(f"NIC {nic.device_id}: {error}") from None

    async def _on_domain(self, what: str, uuid: str, action: t.Callable[[libvirt.virDomain], t.Any],
                         ignore: tuple[int, ...] = ALREADY) -> None:
        def call(connection: libvirt.virConnect) -> None:
            domain = _lookup(connection, uuid)
            if domain is None:
                return
            try:
                action(domain)
            except libvirt.libvirtError as error:
                if error.get_error_code() not in ignore:
                    raise

        await self._call(what, call)

    async def shutdown(self, uuid: str) -> None:
        await self._on_domain("shutdown", uuid, lambda domain: domain.shutdown())

    async def destroy(self, uuid: str) -> None:
        await self._on_domain("destroy", uuid, lambda domain: domain.destroy())

    async def domains(self) -> list[Domain]:
        def gather(connection: libvirt.virConnect) -> list[Domain]:
            found = []
            for domain in connection.listAllDomains(0):
                try:
                    found.append(_describe(domain))
                except libvirt.libvirtError as error:
                    if error.get_error_code() not in GONE:  # gone between the list and the look
                        raise
            return found

        result: list[Domain] = await self._call("list domains", gather)
        return result

    async def domain(self, uuid: str) -> Domain | None:
        def look(connection: libvirt.virConnect) -> Domain | None:
            domain = _lookup(connection, uuid)
            if domain is None:
                return None
            try:
                return _describe(domain)
            except libvirt.libvirtError as error:
                if error.get_error_code() in GONE:
                    return None
                raise

        result: Domain | None = await self._call("domain lookup", look)
        return result

    async def attach_disk(self, uuid: str, disk: DiskDevice) -> None:
        xml = domainxml.disk_xml(disk)
        await self._on_domain("attach disk", uuid, lambda domain: domain.attachDeviceFlags(
            xml, libvirt.VIR_DOMAIN_AFFECT_LIVE), ignore=GONE)

    async def detach_disk(self, uuid: str, disk: DiskDevice) -> None:
        xml = domainxml.disk_xml(disk)
        await self._on_domain("detach disk", uuid, lambda domain: domain.detachDeviceFlags(
            xml, libvirt.VIR_DOMAIN_AFFECT_LIVE), ignore=DETACH_DONE)

    async def block_resize(self, uuid: str, path: str, size_bytes: int) -> None:
        await self._on_domain("block resize", uuid, lambda domain: domain.blockResize(
            path, size_bytes, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES), ignore=GONE)

    # -- live migration ----------------------------------------------------------------------------

    @staticmethod
    def peer_uri(target: MigrationTarget) -> str:
        """The target libvirtd, peer to peer over TCP at the target Host's address (tests: auth none on a private
        namespace address; production would use qemu+tls)."""
        return f"qemu+tcp://{target.address or target.host}/system"

    async def migrate(self, uuid: str, target: MigrationTarget) -> None:
        """Peer-to-peer live migration on a connection of its own, in a thread of its own: it takes seconds to
        minutes (block copy) and must not hold up the calls of the other guests."""
        flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_ABORT_ON_ERROR
        if target.shared_storage:
            # The pool is declared shared (SharedMountPoint, RBD); libvirt cannot prove it for a plain directory
            # and refuses a disk with host caching without this flag.
            flags |= libvirt.VIR_MIGRATE_UNSAFE
        else:
            flags |= libvirt.VIR_MIGRATE_NON_SHARED_DISK  # block copy (copy-storage-all) into the pre-made disks
        dconnuri = self.peer_uri(target)

        def run() -> None:
            try:
                connection = libvirt.open(self.uri)
            except libvirt.libvirtError as error:
                raise HypervisorError(f"cannot connect to libvirt at {self.uri}: {error}") from None
            try:
                domain = _lookup(connection, uuid)
                if domain is None or not domain.isActive():
                    raise HypervisorError(f"domain {uuid} is not running here")
                xml = domain.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE)
                params: dict[str, t.Any] = {libvirt.VIR_MIGRATE_PARAM_DEST_XML: domainxml.migration_xml(
                    xml, host=target.host, disks=target.disks, console_log=target.console_log,
                    config_drive=target.config_drive)}
                if not target.shared_storage:
                    _owner, disks, _console = domainxml.parse(xml)
                    params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = [d.target for d in disks if d.path in target.disks]
                if target.address:
                    params[libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS] = target.address
                try:
                    domain.migrateToURI3(dconnuri, params, flags)
                except libvirt.libvirtError as error:
                    raise HypervisorError(f"live migration to {target.host} failed: {error}") from None
            finally:
                with contextlib.suppress(libvirt.libvirtError):
                    connection.close()

        job = asyncio.ensure_future(asyncio.to_thread(run))
        try:
            await asyncio.wait_for(asyncio.shield(job), target.timeout)
        except TimeoutError:
            # Abort the job (the guest stays here) and let the blocked call return, so the outcome is known.
            def abort() -> None:
                with contextlib.suppress(libvirt.libvirtError):
                    connection = libvirt.open(self.uri)
                    try:
                        domain = _lookup(connection, uuid)
                        if domain is not None:
                            domain.abortJob()
                    finally:
                        connection.close()

            await asyncio.to_thread(abort)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(job, 60.0)
            raise HypervisorError(f"live migration to {target.host} did not finish within {target.timeout:g}s "
                                  "and was aborted") from None

    async def migrating(self, uuid: str) -> bool:
        def look(connection: libvirt.virConnect) -> bool:
            domain = _lookup(connection, uuid)
            if domain is None or not domain.isActive():
                return False
            try:
                return domain.jobInfo()[0] not in (libvirt.VIR_DOMAIN_JOB_NONE, libvirt.VIR_DOMAIN_JOB_COMPLETED,
                                                   libvirt.VIR_DOMAIN_JOB_FAILED, libvirt.VIR_DOMAIN_JOB_CANCELLED)
            except libvirt.libvirtError as error:
                if error.get_error_code() in GONE:
                    return False
                raise

        result: bool = await self._call("job info", look)
        return result

    async def backup_disk(self, uuid: str, path: str, target: str) -> None:
        """A push-mode backup job (``virDomainBackupBegin``): QEMU copies the disk as it was when the job began
        (writes the guest makes meanwhile are copied-before-write), with no change to the domain's disk chain,
        so nothing needs merging back afterwards and a failure leaves the guest untouched. The target is
        written under a temporary name and renamed once the job completed."""
        temporary = target + ".backup"

        def begin(connection: libvirt.virConnect) -> None:
            domain = _lookup(connection, uuid)
            if domain is None:
                raise HypervisorError(f"domain {uuid} does not exist")
            disks = domainxml_disks(domain.XMLDesc(0))
            if path not in disks.values():
                raise HypervisorError(f"domain {uuid} has no disk {path}")
            entries = "".join(
                f"<disk name='{dev}' backup='yes' type='file'><driver type='qcow2'/>"
                f"<target file={quoteattr(temporary)}/></disk>" if source == path
                else f"<disk name='{dev}' backup='no'/>" for dev, source in disks.items())
            domain.backupBegin(f"<domainbackup mode='push'><disks>{entries}</disks></domainbackup>", None, 0)

        def progress(connection: libvirt.virConnect) -> tuple[bool, str]:
            domain = _lookup(connection, uuid)
            if domain is None:
                return True, "the domain went away"
            if domain.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
                return False, ""
            stats = domain.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
            if stats.get("type") == libvirt.VIR_DOMAIN_JOB_COMPLETED:
                return True, ""
            return True, str(stats.get("errmsg") or "the backup job failed")

        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        await self._call("backup begin", begin)
        try:
            while True:
                await asyncio.sleep(0.2)
                done, error = await self._call("backup progress", progress)
                if done:
                    break
        except BaseException:
            await self._on_domain("backup abort", uuid, lambda domain: domain.abortJob(), ignore=(
                *GONE, libvirt.VIR_ERR_OPERATION_INVALID))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        if error:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise HypervisorError(f"backup of {path} failed: {error}")
        os.replace(temporary, target)

    async def define_secret(self, uuid: str, usage: str, value: bytes) -> None:
        xml = domainxml.secret_xml(uuid, usage)

        def define(connection: libvirt.virConnect) -> None:
            secret = connection.secretDefineXML(xml)
            secret.setValue(value)

        await self._call("define secret", define)

    async def close(self) -> None:
        if self._hung is None or self._hung[0].done():
            await asyncio.wrap_future(self._thread.submit(self._drop_connection))
        self._thread.shutdown(wait=False, cancel_futures=True)
