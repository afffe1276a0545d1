"""VirtualMachine: a guest instance and the full launch description the controller resolves for its host."""

from __future__ import annotations

import datetime
import typing as t

from pydantic import ConfigDict, Field

from .network import Segment, TrafficRule
from .storagepool import RbdSource
from .common import (
    IMMUTABLE,
    NAMESPACED,
    STATUS_SUBRESOURCE,
    DisplayText,
    DnsLabel,
    IPv4Address,
    Model,
    Name,
    NamespacedReference,
    ObjectReference,
    Resource,
    ResourceStatus,
    Rule,
    SecretKeyReference,
    StrEnum,
    column,
    rules,
)

USER_DATA_KEY = "userdata"
"""The key of a user data Secret (``spec.userDataSecretRef``) holding the user data."""

MacAddress = t.Annotated[
    str,
    Field(max_length=17),
    # The low bit of the first octet marks multicast; a NIC address must be unicast.
    Rule("self.matches('^[0-9a-f][02468ace](:[0-9a-f]{2}){5}$')",
         "must be a lowercase unicast MAC address such as 02:00:0a:01:01:05"),
]


class DesiredState(StrEnum):
    """What the owner wants: running, stopped, or destroyed (recoverable until expunged)."""

    RUNNING = "Running"
    STOPPED = "Stopped"
    DESTROYED = "Destroyed"


class VmPhase(StrEnum):
    """CloudStack's VM states."""

    STOPPED = "Stopped"
    STARTING = "Starting"
    RUNNING = "Running"
    STOPPING = "Stopping"
    MIGRATING = "Migrating"
    ERROR = "Error"
    DESTROYED = "Destroyed"
    EXPUNGING = "Expunging"


class Placement(Model):
    """Where a guest runs (or must run, when an admin pins it)."""

    zone: Name | None = Field(None, description="Zone.")
    pod: Name | None = Field(None, description="HostPod.")
    cluster: Name | None = Field(None, description="Cluster.")
    host: Name | None = Field(None, description="Host.")
    storage_pool: Name | None = Field(None, description="StoragePool of the root disk.")


class NicRequest(Model):
    """A guest NIC on a network."""

    network: NamespacedReference = Field(
        description="The Network; a shared network of another namespace needs its namespace."
    )
    ip_address: IPv4Address | None = Field(None, description="Static address to ask for; IPAM picks one when unset.")
    mac_address: MacAddress | None = Field(None, description="MAC address to use; generated when unset.")
    default: bool = Field(False, description="The NIC holding the default route; the first NIC when none is marked.")


class VirtualMachineSpec(Model):
    """Desired state of a guest."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            Rule("self.nics.filter(n, n.default).size() <= 1", "at most one NIC is the default", field_path=".nics"),
            Rule("self.nics.all(a, self.nics.exists_one(b, b.network == a.network))",
                 "a guest has one NIC per network", field_path=".nics"),
            Rule("!has(self.userData) || !has(self.userDataSecretRef)", "give userData or userDataSecretRef, not both",
                 field_path=".userData"),
        )
    )

    display_name: DisplayText = Field("", description="Name shown to users; defaults to the object name.")
    hostname: DnsLabel | None = Field(None, description="Guest host name; defaults to the object name.")
    service_offering: Name = Field(description="The ServiceOffering giving CPU, memory and storage type.")
    template: t.Annotated[NamespacedReference, IMMUTABLE] = Field(
        description="The Template (or ISO) the root disk is made from; a public template of another namespace "
        "needs its namespace. Immutable."
    )
    zone: t.Annotated[Name, IMMUTABLE] = Field(description="Zone to deploy in. Immutable.")
    state: DesiredState = Field(
        DesiredState.RUNNING,
        description="Running, Stopped, or Destroyed (recoverable by setting Running or Stopped until the expunge "
        "delay passes; deleting the object expunges at once).",
    )
    nics: t.Annotated[list[NicRequest], Field(max_length=16)] = Field(
        default_factory=list, description="Guest NICs, in device order."
    )
    root_disk_size_gib: t.Annotated[int, Field(ge=1, le=65536)] | None = Field(
        None, alias="rootDiskSizeGiB", description="Root disk size; overrides the offering and template."
    )
    user_data: t.Annotated[str, Field(max_length=32768)] | None = Field(
        None, description="cloud-init user data, served by the network's virtual router and a config drive."
    )
    user_data_secret_ref: ObjectReference | None = Field(
        None, description="A Secret (same namespace) whose key 'userdata' holds the user data."
    )
    ssh_public_keys: t.Annotated[list[t.Annotated[str, Field(max_length=16384)]], Field(max_length=16)] = Field(
        default_factory=list, description="SSH public keys for the default user."
    )
    affinity_groups: t.Annotated[list[Name], Field(max_length=8)] = Field(
        default_factory=list, description="AffinityGroups (same namespace) constraining placement."
    )
    security_groups: t.Annotated[list[Name], Field(max_length=8)] = Field(
        default_factory=list, description="SecurityGroups (same namespace), in basic zones."
    )
    placement: Placement | None = Field(
        None, description="Admin only: pin the guest to a pod, cluster or host; refused with a reason if it "
        "cannot go there."
    )
    ha_enabled: bool | None = Field(
        None, alias="haEnabled", description="Restart elsewhere on host failure; defaults to the offering's offerHA."
    )
    expunge_delay_seconds: t.Annotated[int, Field(ge=0)] = Field(
        86400, description="How long a Destroyed guest keeps its disks and can be recovered."
    )


class LaunchDisk(Model):
    """A disk as the host agent attaches it."""

    volume: str = Field(description="Name of the Volume object.")
    device: str = Field(description="Guest device name, such as vda.")
    bus: str = Field("virtio", description="Disk bus.")
    pool: str = Field(description="StoragePool holding the disk.")
    pool_type: str = Field(description="Filesystem, SharedMountPoint or RBD.")
    path: str = Field(description="File path, or pool/image for RBD.")
    format: str = Field("qcow2", description="qcow2 or raw.")
    size_bytes: int = Field(description="Virtual size.")
    read_only: bool = Field(False, description="Attached read-only (ISOs).")
    rbd: RbdSource | None = Field(None, description="The Ceph pool and client, for a disk on an RBD pool.")


class SecurityGroupPolicy(Model):
    """The security groups of a NIC, resolved to addresses: what the host enforces on the guest's port."""

    ingress: list[TrafficRule] = Field(default_factory=list, description="Allowed ingress; the rest is dropped.")
    egress: list[TrafficRule] = Field(
        default_factory=list, description="Allowed egress; when empty (and egressDefaultAllow), all egress."
    )
    egress_default_allow: bool = Field(True, description="Allow all egress when no egress rule is given.")
    groups: list[str] = Field(default_factory=list, description="The SecurityGroups these rules come from.")


class LaunchNic(Model):
    """A NIC as the host agent plugs it."""

    network: str = Field(description="namespace/name of the Network.")
    device_id: int = Field(0, description="Position of the NIC in the guest (eth0 is 0).")
    mac_address: str = Field(description="MAC address.")
    ip_address: str | None = Field(None, description="Address IPAM gave the NIC (none on L2 networks).")
    gateway: str | None = Field(None, description="Gateway of the network.")
    cidr: str | None = Field(None, description="CIDR of the network.")
    bridge: str = Field(description="Host bridge to plug into.")
    broadcast_uri: str | None = Field(None, description="vlan://<id> or vxlan://<vni>; untagged when unset.")
    vswitch: str = Field("linuxbridge", description="linuxbridge or openvswitch.")
    traffic_label: str | None = Field(None, description="Host bridge carrying the guest traffic type (the label).")
    mtu: int = Field(1500, description="MTU of the segment.")
    default: bool = Field(False, description="Holds the default route.")
    rate_mbps: int | None = Field(None, description="Bandwidth limit.")
    security_groups: SecurityGroupPolicy | None = Field(
        None, description="Rules the host enforces on the port (basic zones); no filtering when unset."
    )

    def segment(self) -> Segment:
        return Segment(vswitch=self.vswitch, traffic_label=self.traffic_label or self.bridge,
                       broadcast_uri=self.broadcast_uri, bridge=self.bridge, mtu=self.mtu)


class NicStatus(Model):
    """A NIC's allocation, kept across stop, start and migration until the NIC or the guest goes."""

    network: str = Field(description="namespace/name of the Network.")
    device_id: int = Field(0, description="Position of the NIC in the guest.")
    mac_address: str = Field(description="MAC address.")
    ip_address: str | None = Field(None, description="Address IPAM gave the NIC.")


class LaunchSpec(Model):
    """Everything the host agent needs to start the guest (CloudStack's StartCommand); written by the
    controller before the agent acts."""

    host: str = Field(description="The host the guest is placed on.")
    cpu_number: int = Field(description="Virtual CPUs.")
    cpu_speed_mhz: int = Field(alias="cpuSpeedMHz", description="CPU speed, used as a share weight.")
    memory_mib: int = Field(alias="memoryMiB", description="Memory in MiB.")
    limit_cpu_use: bool = Field(False, description="Cap CPU at the offering's speed.")
    os_type: str = Field("", description="Guest OS type.")
    disks: list[LaunchDisk] = Field(default_factory=list, description="Disks, root first.")
    nics: list[LaunchNic] = Field(default_factory=list, description="NICs, in device order.")
    kernel_path: str | None = Field(None, description="Kernel for direct-kernel boot.")
    initrd_path: str | None = Field(None, description="Initrd for direct-kernel boot.")
    kernel_cmdline: str | None = Field(None, description="Kernel command line for direct-kernel boot.")
    power_state: DesiredState = Field(DesiredState.RUNNING, description="Running or Stopped: what the agent does.")
    user_data: str | None = Field(None, description="Inline cloud-init user data (spec.userData), for the NoCloud "
                                  "config drive.")
    user_data_secret: SecretKeyReference | None = Field(
        None, description="The Secret key holding the user data (spec.userDataSecretRef): a reference, never the "
        "content; the agent of the guest's host reads it when it writes the config drive.")
    ssh_public_keys: list[str] = Field(default_factory=list, description="SSH keys for the config drive's meta-data.")
    hostname: str = Field("", description="Guest host name for the config drive.")
    ha_enabled: bool = Field(False, description="An HA guest: the agent destroys its domain when the host fences "
                             "itself (it can renew neither its Lease nor its storage heartbeat).")


class DomainInfo(Model):
    """What the host agent observes of the guest on its host (owned by the agent)."""

    host: str | None = Field(None, description="Host the agent observing the guest runs on.")
    domain_uuid: str | None = Field(None, description="UUID of the hypervisor domain.")
    domain_state: str | None = Field(None, description="Hypervisor's state of the domain, such as running.")
    console_log: str | None = Field(None, description="Path of the serial console log on the host.")
    vnc_port: int | None = Field(None, description="VNC port on the host.")
    started_at: datetime.datetime | None = Field(None, description="When the domain was last started.")
    message: str = Field("", description="Last error from the hypervisor.")
    disks: list[str] = Field(default_factory=list, description="Volumes attached to the running domain.")


class MigrationState(Model):
    """A live migration in progress (written by the controller's migration reconciler): the target's
    reservation, recorded here so the capacity ledger rebuilt on a restart holds it."""

    name: str = Field(description="The VirtualMachineMigration.")
    source_host: str = Field(description="Host the guest runs on.")
    target_host: str = Field(description="Host capacity is reserved on.")
    target_pool: str | None = Field(None, description="Local pool of the target the disks move to, if any.")
    migrating: bool = Field(False, description="The source's agent has been told to migrate: it neither starts "
                            "nor stops the domain until this is cleared.")


class VirtualMachineStatus(ResourceStatus):
    """Observed state of a guest."""

    placement: Placement | None = Field(None, description="Where the planner placed the guest.")
    ip_address: str | None = Field(None, description="Address of the default NIC.")
    nics: list[NicStatus] = Field(default_factory=list, description="Allocated NICs (MAC and IP), in device order.")
    launch: LaunchSpec | None = Field(None, description="Resolved description for the host agent.")
    node: DomainInfo | None = Field(None, description="What the host agent observes.")
    destroyed_at: datetime.datetime | None = Field(None, description="When the guest was destroyed.")
    migration: MigrationState | None = Field(None, description="A live migration in progress.")


class VirtualMachine(
    Resource,
    scope=NAMESPACED,
    short_names=["vm"],
    subresources=STATUS_SUBRESOURCE,
    printer_columns=[
        column("Phase", ".status.phase"),
        column("Host", ".status.placement.host"),
        column("IP", ".status.ipAddress"),
        column("Offering", ".spec.serviceOffering"),
        column("Template", ".spec.template.name", priority=1),
        column("Zone", ".spec.zone", priority=1),
    ],
):
    """A guest virtual machine."""

    selectable_fields = (".spec.zone", ".spec.serviceOffering", ".status.placement.host")

    spec: VirtualMachineSpec = Field(description="Desired state of the guest.")
    status: VirtualMachineStatus = Field(default_factory=VirtualMachineStatus, description="Observed state.")
