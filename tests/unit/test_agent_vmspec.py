"""Pure VM logic of the agent (hostagent.vmspec): hot-plug diffs, adoption decisions, the status.node report."""

from __future__ import annotations

import pytest

from controllers.api.v1alpha1.virtualmachine import DomainInfo, LaunchSpec
from hostagent import vmspec
from hostagent.drivers.hypervisor import DiskDevice, Domain, DomainOwner, DomainState

UID = "11111111-0000-4000-8000-000000000001"


def disk(volume: str, device: str, path: str | None = None) -> dict:
    return {"volume": volume, "device": device, "pool": "p", "poolType": "Filesystem",
            "path": path or f"/p/{volume}.qcow2", "sizeBytes": 1 << 30}


def launch(*disks: dict, host: str = "h1", power: str = "Running") -> LaunchSpec:
    return LaunchSpec.model_validate({"host": host, "cpuNumber": 1, "cpuSpeedMHz": 500, "memoryMiB": 128,
                                      "disks": list(disks), "powerState": power})


def device(volume: str, target: str) -> DiskDevice:
    return DiskDevice(volume=volume, path=f"/p/{volume}.qcow2", target=target)


CONFIG_DRIVE = DiskDevice(volume="", path="/s/cd.iso", target="sda", format="raw", bus="scsi", device="cdrom",
                          read_only=True)


# -- hot-plug ------------------------------------------------------------------------------------------


def test_nothing_to_change():
    spec = launch(disk("root", "vda"), disk("d1", "vdb"))
    assert not vmspec.disk_changes(spec, [device("root", "vda"), device("d1", "vdb"), CONFIG_DRIVE])


def test_a_new_data_disk_is_attached_on_a_free_target():
    spec = launch(disk("root", "vda"), disk("a", "vdb"), disk("b", "vdc"))
    # "b" was added while "a" runs as vdc (device names shift when data disks change): b gets a free name.
    changes = vmspec.disk_changes(spec, [device("root", "vda"), device("a", "vdc"), CONFIG_DRIVE])
    assert changes.detach == ()
    assert [(d.volume, d.target, d.path) for d in changes.attach] == [("b", "vdb", "/p/b.qcow2")]


def test_removed_data_disks_are_detached_never_the_root_or_the_config_drive():
    spec = launch(disk("root", "vda"))
    changes = vmspec.disk_changes(spec, [device("root", "vda"), device("a", "vdb"), CONFIG_DRIVE,
                                         DiskDevice(volume="", path="/hand/made.img", target="vdz")])
    assert changes.attach == () and [d.volume for d in changes.detach] == ["a"]


def test_free_targets():
    assert vmspec.free_target(["vda", "vdb"]) == "vdc"
    assert vmspec.free_target(["vda"], preferred="vdd") == "vdd"
    assert vmspec.free_target(["vda", "vdd"], preferred="vdd") == "vdb"
    with pytest.raises(ValueError):
        vmspec.free_target(vmspec.DISK_TARGETS)


# -- adoption -----------------------------------------------------------------------------------------------


OWNER = DomainOwner(namespace="ns", name="web", uid=UID, host="h1")


def vm(uid: str = UID, host: str | None = "h1", power: str = "Running") -> dict:
    status = {"launch": {"host": host, "cpuNumber": 1, "cpuSpeedMHz": 1, "memoryMiB": 96, "powerState": power}} \
        if host else {}
    return {"metadata": {"name": "web", "namespace": "ns", "uid": uid}, "status": status}


@pytest.mark.parametrize("obj, verdict, why", [
    (None, vmspec.Verdict.DESTROY, "VirtualMachine ns/web no longer exists"),
    (vm(uid="other"), vmspec.Verdict.DESTROY, f"VirtualMachine ns/web is a new object (uid other, the domain's is {UID})"),
    (vm(host=None), vmspec.Verdict.DESTROY, "VirtualMachine ns/web has no launch (it is stopped)"),
    (vm(host="h2"), vmspec.Verdict.DESTROY, "VirtualMachine ns/web is placed on host h2"),
    (vm(), vmspec.Verdict.KEEP, "VirtualMachine ns/web is placed on host h1"),
    (vm(power="Stopped"), vmspec.Verdict.KEEP, "VirtualMachine ns/web is placed on host h1"),  # stopped gracefully
])
def test_domain_verdicts(obj, verdict, why):
    assert vmspec.domain_verdict(OWNER, obj) == (verdict, why)


def domain(uid: str, host: str | None = "h1", name: str = "web") -> Domain:
    owner = DomainOwner(namespace="ns", name=name, uid=uid, host=host) if host else None
    return Domain(uuid=uid, name=f"ns_{name}", state=DomainState.RUNNING, owner=owner)


def test_sweep_plan_adopts_what_the_cache_places_here_and_suspects_the_rest():
    domains = [
        domain("a"),                          # cached, placed here: adopted
        domain("b"),                          # not in the cache: suspect (confirm with a GET)
        domain("c"),                          # cached but placed on h2: suspect
        domain("d", host="h9"),               # another agent's domain on a shared libvirtd: ignored
        domain("e", host=None),               # not a Cumulo domain: ignored
        domain("f"),                          # cached without a launch: suspect
    ]
    cache = {"a": vm(uid="a"), "c": vm(uid="c", host="h2"), "f": vm(uid="f", host=None)}
    plan = vmspec.sweep_plan(domains, cache, ["h1"])
    assert [(key, d.uuid) for key, d in plan.adopt] == [("ns/web", "a")]
    assert [d.uuid for d in plan.suspects] == ["b", "c", "f"]


# -- the report ----------------------------------------------------------------------------------------------


def test_report_of_a_running_domain_is_a_valid_domain_info():
    running = Domain(uuid=UID, name="ns_web", state=DomainState.RUNNING,
                     owner=DomainOwner("ns", "web", UID, "h1", started_at="2026-01-01T00:00:00Z"),
                     disks=(device("web-root", "vda"), device("data", "vdb"), CONFIG_DRIVE))
    report = vmspec.domain_report("h1", running, console_log="/s/console.log", message="")
    assert report == {"host": "h1", "domainUuid": UID, "domainState": "running", "consoleLog": "/s/console.log",
                      "startedAt": "2026-01-01T00:00:00Z", "message": "", "disks": ["data", "web-root"]}
    DomainInfo.model_validate(report)


def test_report_without_a_domain_is_shutoff():
    report = vmspec.domain_report("h1", None, console_log=None, message="disk /p/x does not exist")
    assert report == {"host": "h1", "domainUuid": None, "domainState": "shutoff", "consoleLog": None,
                      "startedAt": None, "message": "disk /p/x does not exist", "disks": []}


def test_domain_names_are_unique_per_object():
    assert vmspec.domain_name("ns", "web", UID) == "ns_web-11111111"


def test_nic_devices_from_launch_nics() -> None:
    from controllers.api.v1alpha1.virtualmachine import LaunchNic
    from hostagent.vmspec import nic_devices, nic_port

    uid = "0123abcd-4567-89ab-cdef-000000000001"
    nics = [LaunchNic(network="ns/b", device_id=1, mac_address="02:00:00:00:00:02", bridge="brvx-5001",
                      broadcast_uri="vxlan://5001", traffic_label="cloudbr0", mtu=1450),
            LaunchNic(network="ns/a", device_id=0, mac_address="02:00:00:00:00:01", ip_address="10.0.0.1",
                      bridge="cloudbr0", traffic_label="cloudbr0")]
    devices = nic_devices(uid, nics)
    assert [(d.device_id, d.port, d.mac, d.default) for d in devices] == [
        (0, "vn0123abcd0", "02:00:00:00:00:01", True), (1, "vn0123abcd1", "02:00:00:00:00:02", False)]
    assert devices[1].segment.broadcast_uri == "vxlan://5001" and devices[1].mtu == 1450
    assert len(nic_port("f" * 36, 15)) <= 15
    marked = nic_devices(uid, [nics[0].model_copy(update={"default": True}), nics[1]])
    assert [d.default for d in marked] == [False, True]


def test_a_guest_is_out_of_step_when_its_domain_differs_from_its_report_or_its_launch():
    from hostagent.drivers.hypervisor import DiskDevice, Domain
    from hostagent.vmspec import out_of_step

    def vm(power: str = "Running", migrating: bool = False) -> dict:
        status = {"launch": {"host": "h1", "powerState": power}}
        if migrating:
            status["migration"] = {"migrating": True}
        return {"metadata": {"uid": "u1"}, "status": status}

    root = DiskDevice(volume="web-root", path="/p/root", target="vda")
    running = Domain(uuid="u1", name="d", state="running", disks=(root,))
    report = {"host": "h1", "domainState": "running", "disks": ["web-root"]}
    assert not out_of_step(vm(), running, report)
    assert out_of_step(vm(), None, report)  # gone: wants running
    assert out_of_step(vm(), Domain(uuid="u1", name="d", state="crashed"), {**report, "domainState": "crashed"})
    assert out_of_step(vm(), running, {**report, "domainState": "paused"})  # the report says otherwise
    assert out_of_step(vm(), running, {**report, "disks": ["web-root", "data"]})  # a disk went
    assert out_of_step(vm(), running, {**report, "host": "h2"})
    assert out_of_step(vm(), running, None)  # never reported
    assert out_of_step(vm("Stopped"), running, report)  # should be stopped
    assert not out_of_step(vm("Stopped"), None, {"host": "h1", "domainState": "shutoff", "disks": []})
    assert not out_of_step(vm(migrating=True), None, report)  # the migration's to judge
