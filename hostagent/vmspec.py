"""Pure logic of the agent's VirtualMachine work: the domain a launch describes, which disks to hot-plug or
unplug, what to do with a domain found on the hypervisor (adoption), and the ``status.node`` report.
No I/O here: everything is unit-tested directly.

Objects are the raw JSON dicts the watches deliver (camelCase keys); ``status.launch`` is parsed with the
API model, so the agent reads it exactly as the controller wrote it.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import typing as t
import uuid
from collections.abc import Iterable, Mapping, Sequence

from controllers.api.v1alpha1.virtualmachine import DesiredState, LaunchDisk, LaunchNic, LaunchSpec

from .drivers.hypervisor import (
    CPU_PERIOD_US,
    DiskDevice,
    Domain,
    DomainDescription,
    DomainOwner,
    DomainState,
    NetworkSource,
    NicDevice,
)

MIN_SHARES, MAX_SHARES = 2, 262144       # libvirt/cgroup v1 range of <shares>
MIN_QUOTA_US = 1000                      # libvirt refuses smaller quotas
CEPH_SECRET_NAMESPACE = uuid.UUID("6f1d0c3e-3a51-4d7e-9a39-6d2f2f6c0c11")
DISK_TARGETS = tuple(f"vd{chr(c)}" for c in range(ord("a"), ord("z") + 1))


def metadata(obj: Mapping[str, t.Any]) -> Mapping[str, t.Any]:
    return obj.get("metadata") or {}


def launch_of(vm: Mapping[str, t.Any]) -> LaunchSpec | None:
    """``status.launch`` as the model (None when the controller has written none)."""
    launch = (vm.get("status") or {}).get("launch")
    return LaunchSpec.model_validate(launch) if launch else None


def domain_name(namespace: str, name: str, uid: str) -> str:
    """``<namespace>_<name>-<first 8 of uid>``: readable in ``virsh list``, unique per host (a VirtualMachine
    recreated under the same name does not collide with its predecessor's domain while that one goes)."""
    return f"{namespace}_{name}-{uid[:8]}"


def cpu_shares(launch: LaunchSpec) -> int:
    """CloudStack's weight: vCPUs × MHz, within libvirt's range."""
    return max(MIN_SHARES, min(MAX_SHARES, launch.cpu_number * launch.cpu_speed_mhz))


def cpu_quota_us(launch: LaunchSpec, host_mhz: int | None) -> int | None:
    """With ``limitCpuUse``, each vCPU gets the offering's share of a host CPU per period
    (speed / host speed), as CloudStack caps it; None when unlimited or the host speed is unknown."""
    if not launch.limit_cpu_use or not host_mhz:
        return None
    if launch.cpu_speed_mhz >= host_mhz:
        return None  # asking for a whole CPU or more: nothing to cap
    return max(MIN_QUOTA_US, CPU_PERIOD_US * launch.cpu_speed_mhz // host_mhz)


def libvirt_secret_uuid(monitors: Iterable[str], user: str) -> str:
    """The libvirt secret (usage ``ceph``) holding a client's key: one per cluster and client, the same on every
    host and across agent restarts, so a running guest's disk keeps naming a secret that exists."""
    return str(uuid.uuid5(CEPH_SECRET_NAMESPACE, f"{','.join(sorted(monitors))}/client.{user}"))


def disk_device(disk: LaunchDisk, target: str | None = None) -> DiskDevice:
    """A launch disk as a device: a file, or (RBD) a network disk ``pool/image`` with its monitors and secret."""
    network = None
    if disk.rbd is not None:
        network = NetworkSource(hosts=tuple(disk.rbd.monitors), user=disk.rbd.user,
                                secret_uuid=libvirt_secret_uuid(disk.rbd.monitors, disk.rbd.user))
    return DiskDevice(volume=disk.volume, path=disk.path, target=target or disk.device, format=disk.format or "qcow2",
                      bus="virtio", device="disk", read_only=disk.read_only, network=network)


def nic_port(uid: str, device_id: int) -> str:
    """The host-side interface of a guest NIC: ``vn<first 8 hex digits of the uid><device>`` (≤ 12 characters,
    within Linux's 15; not libvirt's reserved ``vnet``/``vif`` prefixes, whose names libvirt would replace)."""
    return f"vn{uid.replace('-', '')[:8]}{device_id}"


def nic_devices(uid: str, nics: Iterable[LaunchNic]) -> tuple[NicDevice, ...]:
    """The launch's NICs as devices, in device order; the default NIC is the marked one, else the first."""
    ordered = sorted(nics, key=lambda nic: nic.device_id)
    default = next((nic.device_id for nic in ordered if nic.default), ordered[0].device_id if ordered else None)
    return tuple(NicDevice(mac=nic.mac_address, segment=nic.segment(), device_id=nic.device_id,
                           port=nic_port(uid, nic.device_id), ip_address=nic.ip_address,
                           default=nic.device_id == default, rate_mbps=nic.rate_mbps) for nic in ordered)


def describe(vm: Mapping[str, t.Any], launch: LaunchSpec, *, console_log: str | None, config_drive: str | None,
             host_mhz: int | None, started_at: datetime.datetime) -> DomainDescription:
    """The domain ``launch`` asks for. Disks keep launch order (root first) with targets vda, vdb… in that
    order, whatever the launch's device names say (the guest numbers virtio disks by PCI order anyway)."""
    meta = metadata(vm)
    uid = str(meta["uid"])
    owner = DomainOwner(namespace=str(meta.get("namespace", "")), name=str(meta["name"]), uid=uid, host=launch.host,
                        launch_version=str(meta.get("resourceVersion", "")),
                        started_at=started_at.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    disks = tuple(disk_device(disk, DISK_TARGETS[index]) for index, disk in enumerate(launch.disks))
    return DomainDescription(
        uuid=uid, name=domain_name(owner.namespace, owner.name, uid), owner=owner, cpus=launch.cpu_number,
        memory_mib=launch.memory_mib, cpu_shares=cpu_shares(launch), cpu_quota_us=cpu_quota_us(launch, host_mhz),
        disks=disks, nics=nic_devices(uid, launch.nics), kernel=launch.kernel_path or None, initrd=launch.initrd_path or None,
        cmdline=launch.kernel_cmdline if launch.kernel_path else None, config_drive=config_drive,
        console_log=console_log)


# --------------------------------------------------------------------------------------------
# Disks of a running domain


@dataclasses.dataclass(frozen=True)
class DiskChanges:
    attach: tuple[DiskDevice, ...] = ()
    detach: tuple[DiskDevice, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.attach or self.detach)


def free_target(used: Iterable[str], preferred: str | None = None) -> str:
    taken = set(used)
    if preferred and preferred.startswith("vd") and preferred not in taken:
        return preferred
    for target in DISK_TARGETS[1:]:  # vda is the root disk's, always
        if target not in taken:
            return target
    raise ValueError("no free virtio disk name left (vdb…vdz all in use)")


def disk_changes(launch: LaunchSpec, current: Sequence[DiskDevice]) -> DiskChanges:
    """The data disks to hot-plug (in the launch but not in the domain) and to unplug (Cumulo volumes in the
    domain but no longer in the launch). The root disk (the launch's first) is never touched; disks that
    are not Cumulo volumes (the config drive) neither. New disks get free targets."""
    if not launch.disks:
        return DiskChanges()
    root = launch.disks[0].volume
    wanted = {disk.volume: disk for disk in launch.disks[1:]}
    present = {disk.volume: disk for disk in current if disk.volume}
    detach = tuple(disk for volume, disk in present.items() if volume != root and volume not in wanted)
    used = [disk.target for disk in current]
    attach = []
    for volume, disk in wanted.items():
        if volume in present:
            continue
        target = free_target(used, disk.device)
        used.append(target)
        attach.append(disk_device(disk, target))
    return DiskChanges(attach=tuple(attach), detach=detach)


# --------------------------------------------------------------------------------------------
# Adoption


class Verdict(str, enum.Enum):
    KEEP = "keep"
    DESTROY = "destroy"


def placed_host(vm: Mapping[str, t.Any] | None) -> str | None:
    """The host the VirtualMachine's launch names (where its domain must run), if any."""
    if vm is None:
        return None
    launch = (vm.get("status") or {}).get("launch")
    return launch.get("host") if isinstance(launch, Mapping) else None


def migration_target(vm: Mapping[str, t.Any] | None) -> str | None:
    """The host a live migration in progress moves the guest to (``status.migration``), or None."""
    migration = ((vm or {}).get("status") or {}).get("migration") or {}
    return migration.get("targetHost")


def migrating(vm: Mapping[str, t.Any]) -> bool:
    """The source's agent has handed the domain to a live migration: it neither starts nor stops it."""
    return bool(((vm.get("status") or {}).get("migration") or {}).get("migrating"))


def domain_verdict(owner: DomainOwner, vm: Mapping[str, t.Any] | None) -> tuple[Verdict, str]:
    """What to do with a Cumulo domain given its VirtualMachine as a direct GET returned it (None: 404).
    The domain keeps running exactly when the object still exists (same uid) and its launch names the
    host the domain runs on; a launch that asks for Stopped still keeps it (the normal reconcile shuts it
    down gracefully)."""
    key = owner.key
    if vm is None:
        return Verdict.DESTROY, f"VirtualMachine {key} no longer exists"
    uid = metadata(vm).get("uid")
    if uid != owner.uid:
        return Verdict.DESTROY, f"VirtualMachine {key} is a new object (uid {uid}, the domain's is {owner.uid})"
    host = placed_host(vm)
    target = migration_target(vm)
    if target is not None and target == owner.host:
        return Verdict.KEEP, f"VirtualMachine {key} is migrating to host {target}"
    if host is None:
        return Verdict.DESTROY, f"VirtualMachine {key} has no launch (it is stopped)"
    if host != owner.host:
        return Verdict.DESTROY, f"VirtualMachine {key} is placed on host {host}"
    return Verdict.KEEP, f"VirtualMachine {key} is placed on host {host}"


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    adopt: tuple[tuple[str, Domain], ...]     # (cache key, domain): the cache says it belongs here
    suspects: tuple[Domain, ...]              # to confirm with a direct GET before destroying


def sweep_plan(domains: Iterable[Domain], vms_by_uid: Mapping[str, Mapping[str, t.Any]],
               hosts: Iterable[str]) -> SweepPlan:
    """Sort the hypervisor's domains: not Cumulo's, or of another host's agent: ignored; of a
    VirtualMachine the cache shows placed on the domain's host: adopted (its reconcile takes over, the
    domain untouched); anything else is a suspect, to be confirmed with the API before it is destroyed
    (a watch that lags or misses an event must never kill a guest)."""
    mine = set(hosts)
    adopt, suspects = [], []
    for domain in domains:
        owner = domain.owner
        if owner is None or owner.host not in mine:
            continue
        vm = vms_by_uid.get(owner.uid)
        if vm is not None and placed_host(vm) == owner.host:
            adopt.append((f"{owner.namespace}/{owner.name}", domain))
        else:
            suspects.append(domain)
    return SweepPlan(adopt=tuple(adopt), suspects=tuple(suspects))


# --------------------------------------------------------------------------------------------
# status.node


def wants_running(launch: LaunchSpec) -> bool:
    return launch.power_state == DesiredState.RUNNING


def out_of_step(vm: Mapping[str, t.Any], domain: Domain | None, report: Mapping[str, t.Any] | None) -> bool:
    """Whether a guest placed here needs a reconcile, judged from one listing of the host's domains: its domain
    is not in the state (or does not have the disks) its last report says, or not running when its launch wants
    it running, or running when it wants it stopped. A guest being live-migrated is the migration's to judge."""
    if migrating(vm):
        return False
    launch = (vm.get("status") or {}).get("launch") or {}
    report = report or {}
    active = domain is not None and domain.active
    if active != (launch.get("powerState") == DesiredState.RUNNING):
        return True
    state = domain.state if domain is not None else DomainState.SHUTOFF
    return report.get("host") != launch.get("host") or report.get("domainState") != state or \
        (report.get("disks") or []) != attached_volumes(domain)


def attached_volumes(domain: Domain | None) -> list[str]:
    """The Volumes a domain has attached, sorted (``status.node.disks``)."""
    return sorted(disk.volume for disk in domain.disks if disk.volume) if domain is not None else []


def domain_report(host: str, domain: Domain | None, *, console_log: str | None, message: str) -> dict[str, t.Any]:
    """``status.node`` (the DomainInfo model's JSON) for a VirtualMachine placed on ``host``."""
    report: dict[str, t.Any] = {
        "host": host,
        "domainUuid": domain.uuid if domain is not None and domain.active else None,
        "domainState": domain.state if domain is not None else DomainState.SHUTOFF,
        "consoleLog": console_log,
        "startedAt": domain.owner.started_at if domain is not None and domain.owner and domain.active else None,
        "message": message,
        "disks": attached_volumes(domain),
    }
    return report

