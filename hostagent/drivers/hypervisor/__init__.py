"""The hypervisor driver interface: what the agent asks of the hypervisor on its host.

Implementations: :mod:`.libvirt` (a real libvirtd, QEMU/KVM or TCG), :mod:`.simulator`
(configured capacity, fault injection; CloudStack's Simulator hypervisor) and :mod:`.netns` (guests are
network namespaces with real NICs on real segments: fast guests for network tests). Every method is a
coroutine: the libvirt driver runs its blocking calls in a thread, the simulator sleeps for
injected latency without blocking the other simulated hosts of the process.

Domain operations take a fully resolved :class:`DomainDescription` (built from the controller's
``status.launch``, DESIGN.md §3 "resolved hand-off") or a domain UUID (= the VirtualMachine's uid), and
raise :class:`HypervisorError` with a message fit for a status field. Domains are transient: a stopped
domain does not exist (the VirtualMachine object is the definition), so "shutoff" and "absent" are the
same thing to the agent.
"""

from __future__ import annotations

import dataclasses
import datetime
import typing as t

from controllers.api.v1alpha1.common import HypervisorType
from controllers.api.v1alpha1.network import Segment


class HypervisorError(Exception):
    """A hypervisor call failed; the message is reported as the host's hypervisor error."""


@dataclasses.dataclass(frozen=True)
class HostFacts:
    """What the hypervisor says about the host; the agent reports it in ``status.node``."""

    hypervisor_type: HypervisorType
    hypervisor_version: str | None = None
    libvirt_version: str | None = None
    virt_type: str | None = None
    cpu_model: str | None = None
    cpu_sockets: int | None = None
    cpu_cores: int | None = None
    cpu_speed_mhz: int | None = None
    memory_mib: int | None = None
    architecture: str | None = None


class DomainState:
    """Values of :attr:`Domain.state` (reported as ``status.node.domainState``)."""

    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"    # an ACPI shutdown is in progress
    SHUTOFF = "shutoff"      # also: no domain at all (domains are transient)
    CRASHED = "crashed"
    SUSPENDED = "suspended"
    UNKNOWN = "unknown"


@dataclasses.dataclass(frozen=True)
class NetworkSource:
    """Where a network disk is: an RBD image (``DiskDevice.path`` is ``pool/image``) on these monitors, reached
    as ``client.<user>`` with the key in the libvirt secret ``secret_uuid`` (see :meth:`HypervisorDriver.define_secret`)."""

    hosts: tuple[str, ...]       # host:port of each monitor
    user: str
    secret_uuid: str
    protocol: str = "rbd"


@dataclasses.dataclass(frozen=True)
class DiskDevice:
    """A disk of a domain. ``volume`` names the Volume object ("" for the config drive)."""

    volume: str
    path: str
    target: str                 # guest device name: vda, vdb... (sda for the config drive CD)
    format: str = "qcow2"
    bus: str = "virtio"
    device: str = "disk"        # disk | cdrom
    read_only: bool = False
    network: NetworkSource | None = None  # None: a file on the host


@dataclasses.dataclass(frozen=True)
class NicDevice:
    """A NIC of a domain: its MAC, the segment it plugs into (ensured by the agent before the domain starts)
    and ``port``, the host-side interface (libvirt's tap ``<target dev>``, a netns guest's veth end)."""

    mac: str
    segment: Segment
    device_id: int              # eth<device_id> in the guest
    port: str
    ip_address: str | None = None
    default: bool = False       # holds the default route
    rate_mbps: int | None = None  # the network offering's rate limit, each direction

    @property
    def mtu(self) -> int:
        return self.segment.mtu


@dataclasses.dataclass(frozen=True)
class DomainOwner:
    """Which VirtualMachine a domain belongs to; kept in the domain itself (libvirt: a metadata element), so a
    restarted agent can adopt its domains without any state of its own."""

    namespace: str
    name: str
    uid: str
    host: str                   # the Host the agent started it for
    launch_version: str = ""    # resourceVersion of the VirtualMachine the launch was read from
    started_at: str = ""        # RFC 3339, when the agent started it

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclasses.dataclass(frozen=True)
class DomainDescription:
    """Everything needed to start a domain; built from ``status.launch`` by :func:`hostagent.vmspec.describe`."""

    uuid: str
    name: str
    owner: DomainOwner
    cpus: int
    memory_mib: int
    cpu_shares: int
    cpu_quota_us: int | None = None     # per vCPU and CPU_PERIOD_US, when the offering limits CPU use
    disks: tuple[DiskDevice, ...] = ()  # in launch order: the root disk first
    nics: tuple[NicDevice, ...] = ()    # in device order
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    config_drive: str | None = None     # path of the NoCloud ISO
    console_log: str | None = None      # file receiving the serial console
    machine: str = "q35"
    spare_pcie_ports: int = 8            # q35: free root ports for hot-plugged disks


CPU_PERIOD_US = 100_000


@dataclasses.dataclass(frozen=True)
class MigrationTarget:
    """Where and how a running domain moves (from a VirtualMachineMigration's plan and the target's report)."""

    host: str                           # the target Host (the domain's owner names it after the move)
    address: str | None                 # the target hypervisor's address (libvirt: qemu+tcp://<address>/system)
    disks: t.Mapping[str, str] = dataclasses.field(default_factory=dict)  # source path -> target path (copied)
    console_log: str | None = None      # files the target's agent prepared
    config_drive: str | None = None
    shared_storage: bool = True         # the disks stay where they are (memory-only migration)
    timeout: float = 600.0


@dataclasses.dataclass(frozen=True)
class Domain:
    """A domain as the hypervisor has it."""

    uuid: str
    name: str
    state: str
    owner: DomainOwner | None = None    # None: not a Cumulo domain; the agent leaves it alone
    disks: tuple[DiskDevice, ...] = ()
    console_log: str | None = None
    id: int | None = None               # the hypervisor's run id (libvirt: changes on every start)

    @property
    def started_at(self) -> datetime.datetime | None:
        if self.owner is None or not self.owner.started_at:
            return None
        try:
            return datetime.datetime.fromisoformat(self.owner.started_at.replace("Z", "+00:00"))
        except ValueError:
            return None

    @property
    def active(self) -> bool:
        return self.state not in (DomainState.SHUTOFF, DomainState.CRASHED)


@t.runtime_checkable
class HypervisorDriver(t.Protocol):
    """One host's hypervisor.

    ``local_files``: whether domains of this driver read files of this host (config drive, console log);
    the simulator's do not, so the agent does not write them for simulated hosts.
    """

    hypervisor_type: HypervisorType
    local_files: bool

    async def host_facts(self) -> HostFacts:
        """CPU, memory and versions of the host. Raises :class:`HypervisorError`."""
        ...

    async def start(self, description: DomainDescription) -> Domain:
        """Create and start a transient domain. Raises :class:`HypervisorError`."""
        ...

    async def shutdown(self, uuid: str) -> None:
        """Ask the guest to power off (ACPI power button); returns at once. No error if the domain is gone."""
        ...

    async def destroy(self, uuid: str) -> None:
        """Power the domain off at once (pulling the plug). No error if it is gone."""
        ...

    async def domains(self) -> list[Domain]:
        """Every domain of the hypervisor, Cumulo's or not."""
        ...

    async def domain(self, uuid: str) -> Domain | None:
        """The domain with this UUID, or None."""
        ...

    async def attach_disk(self, uuid: str, disk: DiskDevice) -> None:
        """Hot-plug a disk into the running domain."""
        ...

    async def detach_disk(self, uuid: str, disk: DiskDevice) -> None:
        """Ask for a disk's hot-unplug; the guest completes it (``domain()`` shows it until then). No error if
        it is already gone or on its way out."""
        ...

    async def block_resize(self, uuid: str, path: str, size_bytes: int) -> None:
        """Grow the disk at ``path`` of the running domain; the guest sees the new size."""
        ...

    async def migrate(self, uuid: str, target: MigrationTarget) -> None:
        """Live-migrate the running domain to ``target`` (peer to peer); returns once it runs there and is gone
        here. On failure it keeps running here and :class:`HypervisorError` says why."""
        ...

    async def migrating(self, uuid: str) -> bool:
        """Whether a migration job of the domain is running (one an agent started before it restarted)."""
        ...

    async def backup_disk(self, uuid: str, path: str, target: str) -> None:
        """Copy the disk at ``path`` of the running domain, as it is at the call, to a new qcow2 file
        ``target`` while the guest keeps running and writing (libvirt's push-mode backup job); returns once
        the copy is complete."""
        ...

    async def define_secret(self, uuid: str, usage: str, value: bytes) -> None:
        """Define (or update) the Ceph secret ``uuid`` holding ``value`` (the raw key), which network disks name
        in their ``NetworkSource.secret_uuid``. Drivers whose guests have no network disks accept and ignore it."""
        ...

    async def close(self) -> None:
        """Release connections; the driver is not used afterwards."""
        ...


def version_string(version: int) -> str:
    """libvirt's packed version number (major * 1,000,000 + minor * 1,000 + release) as ``a.b.c``."""
    return f"{version // 1_000_000}.{version // 1_000 % 1_000}.{version % 1_000}"
