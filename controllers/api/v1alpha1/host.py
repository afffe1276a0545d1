"""Host: one hypervisor node, run by a cumulo-agent."""

from __future__ import annotations

import datetime
import hashlib
import typing as t

from pydantic import Field

from .common import (
    CLUSTER,
    IMMUTABLE,
    STATUS_SUBRESOURCE,
    AllocationState,
    Capacity,
    HypervisorType,
    Model,
    Name,
    Resource,
    ResourceStatus,
    StrEnum,
    Tags,
    column,
)

HOST_LABEL = "cumulo.io/host"
"""Label binding an object to the host whose agent acts on it (agents watch with this selector)."""

NODE_CLUSTER_LABEL = "cumulo.io/cluster"
"""Kubernetes Node label: an agent on that node registers its Host in this Cluster."""


class HostState(StrEnum):
    """Connection state, as CloudStack's host status."""

    CONNECTING = "Connecting"
    UP = "Up"
    DISCONNECTED = "Disconnected"
    ALERT = "Alert"
    DOWN = "Down"
    ERROR = "Error"


class ResourceState(StrEnum):
    """Administrative state, as CloudStack's host resource state."""

    ENABLED = "Enabled"
    DISABLED = "Disabled"
    PREPARE_FOR_MAINTENANCE = "PrepareForMaintenance"
    MAINTENANCE = "Maintenance"
    ERROR_IN_MAINTENANCE = "ErrorInMaintenance"


class HostSpec(Model):
    """Desired state of a host."""

    cluster: t.Annotated[Name, IMMUTABLE] = Field(description="Name of the Cluster the host belongs to. Immutable.")
    node_name: t.Annotated[str, Field(max_length=253)] | None = Field(
        None, description="Kubernetes node the agent runs on; defaults to the host's name."
    )
    allocation_state: AllocationState = Field(
        AllocationState.ENABLED, description="Disabled hosts take no new placements; running guests stay."
    )
    maintenance: bool = Field(
        False,
        description="Put the host into maintenance: no new placements, running guests are live-migrated away. "
        "Set back to false to cancel or to leave maintenance.",
    )
    host_tags: Tags = Field(
        default_factory=list, description="Tags matched against the host tags of service offerings."
    )
    ha_enabled: bool = Field(
        True, description="Restart this host's HA-enabled guests elsewhere when it is found Down."
    )


HEARTBEAT_LABEL = "cumulo.io/heartbeat"
"""Label on the coordination.k8s.io Leases agents renew as host heartbeats (value: the host name)."""



def heartbeat_lease_name(host: str) -> str:
    """Name of the host's heartbeat Lease in the system namespace."""
    return f"host-{host}"


SIMULATOR_FAULTS_ANNOTATION = "cumulo.io/simulator-faults"
"""Host annotation with the simulator's fault injection, JSON: {operation: Fault}."""

INVESTIGATE_PREFIX = "investigate.cumulo.io/"
"""Annotations the controller puts on a neighbour Host to ask its agent to read a suspect host's storage
heartbeat (one per suspect, so investigations of two hosts never write the same key). The value is JSON
(:class:`InvestigationRequest`); the agent answers in ``status.node.investigations``."""


def investigate_annotation(suspect: str) -> str:
    """The annotation key asking about ``suspect`` (a name part is at most 63 characters)."""
    if len(suspect) <= 63:
        return INVESTIGATE_PREFIX + suspect
    return INVESTIGATE_PREFIX + "h-" + hashlib.sha256(suspect.encode()).hexdigest()[:32]


class HeartbeatPool(Model):
    """A shared primary pool holding storage heartbeats, as an investigating agent reads it."""

    name: str = Field(description="StoragePool name.")
    type: str = Field(description="SharedMountPoint or RBD.")
    path: str = Field(description="Mount point (SharedMountPoint) or Ceph pool (RBD).")
    disks: list[str] = Field(
        default_factory=list, description="Disk files of the suspect's HA guests on this pool: one written after "
        "the suspect should have fenced itself shows a guest still running (CloudStack's VM activity check)."
    )


class InvestigationRequest(Model):
    """What the controller asks a neighbour's agent about a host whose Lease expired."""

    host: str = Field(description="The suspect host.")
    stale_after_seconds: float = Field(description="A heartbeat older than this counts as stale.")
    pools: list[HeartbeatPool] = Field(default_factory=list, description="Pools to read its heartbeat on.")


class PeerHeartbeat(Model):
    """A suspect host's storage heartbeat on one pool, as a neighbour's agent read it."""

    readable: bool = Field(description="The neighbour could read the pool.")
    fresh: bool | None = Field(None, description="Written within staleAfterSeconds; unknown when unreadable.")
    last_write: datetime.datetime | None = Field(None, description="When the suspect last wrote it (its clock).")
    guest_activity: str | None = Field(
        None, description="A disk of the suspect's HA guests written after it should have fenced itself: its guests "
        "still run, so nothing may restart them elsewhere."
    )
    message: str = Field("", description="Why unreadable, or what was found.")


class StorageReport(Model):
    """What the agent sees of one primary pool or image store from its host."""

    reachable: bool = Field(description="The host can read and write it.")
    message: str = Field("", description="Why not, when unreachable.")
    capacity_bytes: int | None = Field(None, description="Size of the filesystem holding it, in bytes.")
    used_bytes: int | None = Field(None, description="Space used on that filesystem, in bytes.")


class NodeInfo(Model):
    """Facts the host agent reports about its node (owned by the agent)."""

    hypervisor_type: HypervisorType | None = Field(None, description="Hypervisor driver the agent runs.")
    hypervisor_version: str | None = Field(None, description="Version of the hypervisor (QEMU).")
    libvirt_version: str | None = Field(None, description="Version of libvirtd, when the driver uses libvirt.")
    virt_type: str | None = Field(None, description="libvirt domain type used: qemu (TCG) or kvm.")
    cpu_model: str | None = Field(None, description="Host CPU model.")
    cpu_sockets: int | None = Field(None, description="CPU sockets.")
    cpu_cores: int | None = Field(None, description="Physical CPU cores (threads) usable by guests.")
    cpu_speed_mhz: int | None = Field(None, alias="cpuSpeedMHz", description="CPU speed in MHz.")
    memory_mib: int | None = Field(None, alias="memoryMiB", description="Memory usable by guests, in MiB.")
    architecture: str | None = Field(None, description="CPU architecture, such as x86_64.")
    kernel_version: str | None = Field(None, description="Kernel release of the node.")
    agent_version: str | None = Field(None, description="Version of cumulo-agent.")
    private_ip: str | None = Field(None, description="Address the host is reached at on the management network.")
    hypervisor_healthy: bool | None = Field(
        None, description="Whether the last call to the hypervisor succeeded."
    )
    message: str = Field("", description="The hypervisor's last error, when unhealthy.")
    storage_pools: dict[str, StorageReport] = Field(
        default_factory=dict, description="Primary storage pools the host may use, by pool name."
    )
    image_stores: dict[str, StorageReport] = Field(
        default_factory=dict, description="Image stores of the host's zone, by store name."
    )
    bridges: dict[str, bool] = Field(
        default_factory=dict, description="Traffic-label bridges of the zone's physical networks: present or not."
    )
    investigations: dict[str, t.Annotated[dict[str, PeerHeartbeat], Field(
        description="The suspect's storage heartbeat, by pool name.")]] = Field(
        default_factory=dict, description="Storage heartbeats of suspect hosts the controller asked this host to "
        "read, by host and pool name."
    )
    reported_at: datetime.datetime | None = Field(None, description="When the agent last reported these facts.")


class HostStatus(ResourceStatus):
    """Observed state of a host."""

    effective_allocation_state: AllocationState | None = Field(
        None, description="Enabled only when this object and every parent above it are Enabled; "
        "the planner places only where this is Enabled."
    )

    state: HostState | None = Field(None, description="Connection state: Connecting, Up, Disconnected, Alert, Down.")
    resource_state: ResourceState | None = Field(
        None, description="Administrative state: Enabled, Disabled, PrepareForMaintenance, Maintenance."
    )
    zone: str | None = Field(None, description="Zone of the host.")
    pod: str | None = Field(None, description="Pod of the host.")
    capacity: Capacity | None = Field(None, description="Capacity after the cluster's overcommit ratios.")
    virtual_machines: int | None = Field(None, description="Number of guests placed on the host.")
    node: NodeInfo | None = Field(None, description="Facts reported by the host's agent.")


class Host(
    Resource,
    scope=CLUSTER,
    short_names=["hv"],
    subresources=STATUS_SUBRESOURCE,
    printer_columns=[
        column("Cluster", ".spec.cluster"),
        column("State", ".status.state"),
        column("Resource-State", ".status.resourceState"),
        column("Hypervisor", ".status.node.hypervisorType"),
        column("VMs", ".status.virtualMachines", "integer"),
        column("CPU", ".status.capacity.cpuCores.allocated", "integer", 1, "Allocated vCPUs"),
        column("CPU-Total", ".status.capacity.cpuCores.total", "integer", 1),
        column("Memory-MiB", ".status.capacity.memoryMiB.allocated", "integer", 1, "Allocated memory"),
        column("Memory-Total", ".status.capacity.memoryMiB.total", "integer", 1),
    ],
):
    """A hypervisor host, run by the cumulo-agent on its node."""

    selectable_fields = (".spec.cluster",)

    spec: HostSpec = Field(description="Desired state of the host.")
    status: HostStatus = Field(default_factory=HostStatus, description="Observed state of the host.")
