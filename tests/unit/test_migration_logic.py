"""Pure parts of live migration and maintenance: the planner avoiding the source, which disks move and where,
the launch on the target, the evacuation of a host in maintenance, the destination domain XML, the simulator's
migration, and the sweep keeping a domain that is arriving."""

from __future__ import annotations

import asyncio
import datetime
import types
import xml.etree.ElementTree as ET

import pytest

from controllers import migration
from controllers.api.v1alpha1.host import ResourceState
from controllers.api.v1alpha1.virtualmachine import LaunchSpec
from controllers.api.v1alpha1.virtualmachinemigration import MigrationDisk, VirtualMachineMigration
from controllers.planner import HostCandidate, Inventory, Ledger, PoolCandidate, Request, plan
from hostagent import vmspec
from hostagent.drivers.hypervisor import (DiskDevice, Domain, DomainDescription, DomainOwner, HypervisorError,
                                          MigrationTarget, domainxml)
from hostagent.drivers.hypervisor.simulator import PEERS, SimulatedCapacity, SimulatorDriver
from hostagent.faults import Fault, FaultInjector

GIB = 2**30


def _host(name: str, cpu: int = 4) -> HostCandidate:
    return HostCandidate(name=name, zone="z1", pod="p1", cluster="c1", hypervisor="KVM", tags=frozenset(),
                         cpu_total=cpu, memory_total_mib=4096)


def _pool(host: str) -> PoolCandidate:
    return PoolCandidate(f"{host}-local", "Host", host, frozenset(), True, frozenset({host}), 100 * GIB, 0, True)


def test_the_planner_never_picks_the_source_and_says_so():
    hosts, pools = [_host("h1"), _host("h2", cpu=1)], [_pool("h1"), _pool("h2")]
    ledger = Ledger()
    ledger.reserve("t/vm", "h1", 1, 512, "t")
    request = Request(key="t/vm@migration", owner="t", zone="z1", cpu=1, memory_mib=512, hypervisor="KVM",
                      storage_type="local", disk_bytes=GIB, avoid=frozenset({"h1"}))
    decision = plan(request, Inventory(hosts, pools), ledger)
    assert (decision.host, decision.pool) == ("h2", "h2-local")
    ledger.reserve("t/other", "h2", 1, 512, "t")
    refused = plan(request, Inventory(hosts, pools), ledger)
    assert refused.reason == "InsufficientCapacity"
    assert "h1 is the guest's current host" in refused.message and "h2 has 0 of 1 vCPUs free" in refused.message
    alone = plan(request, Inventory(hosts[:1], pools[:1]), Ledger())
    assert alone.reason == "NoMatchingHost" and "the guest's current host" in alone.message


def _volume(name: str, pool: str, uid: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(metadata=types.SimpleNamespace(name=name, uid=uid), status=types.SimpleNamespace(
        storage_pool=pool, path=f"/pools/{pool}/{uid}.qcow2", size_bytes=GIB))


def _storage_pool(name: str, scope: str, path: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(metadata=types.SimpleNamespace(name=name), spec=types.SimpleNamespace(
        scope=scope, path=path))


def test_local_disks_move_into_the_target_pool_and_the_launch_follows():
    pools = {"h1-local": _storage_pool("h1-local", "Host", "/pools/h1-local"),
             "shared": _storage_pool("shared", "Cluster", "/mnt/shared")}
    root, data = _volume("web-root", "h1-local", "u1"), _volume("web-data", "shared", "u2")
    moving = migration.local_volumes([root, data], pools)
    assert moving == [root]
    disks = migration.migration_disks(moving, _storage_pool("h2-local", "Host", "/pools/h2-local/"))
    assert disks == [MigrationDisk(volume="web-root", source_pool="h1-local", source_path="/pools/h1-local/u1.qcow2",
                                   target_pool="h2-local", target_path="/pools/h2-local/u1.qcow2", size_bytes=GIB)]
    launch = LaunchSpec.model_validate({
        "host": "h1", "cpuNumber": 1, "cpuSpeedMHz": 1000, "memoryMiB": 128,
        "disks": [{"volume": "web-root", "device": "vda", "pool": "h1-local", "poolType": "Filesystem",
                   "path": "/pools/h1-local/u1.qcow2", "sizeBytes": GIB},
                  {"volume": "web-data", "device": "vdb", "pool": "shared", "poolType": "SharedMountPoint",
                   "path": "/mnt/shared/u2.qcow2", "sizeBytes": GIB}],
        "nics": [{"network": "t/net", "macAddress": "02:00:0a:01:01:05", "ipAddress": "10.1.1.5",
                  "bridge": "brx"}]})
    moved = migration.moved_launch(launch, "h2", disks)
    assert moved.host == "h2"
    assert [(d.pool, d.path) for d in moved.disks] == [("h2-local", "/pools/h2-local/u1.qcow2"),
                                                       ("shared", "/mnt/shared/u2.qcow2")]
    assert moved.nics == launch.nics  # MAC and IP kept


def _vm(name: str, migrating: bool = False) -> types.SimpleNamespace:
    return types.SimpleNamespace(metadata=types.SimpleNamespace(name=name, namespace="t"),
                                 status=types.SimpleNamespace(migration=object() if migrating else None))


def _migration(vm: str, phase: str | None, created: int, source: str = "h1", reason: str | None = None,
               message: str = "") -> VirtualMachineMigration:
    stamp = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(seconds=created)
    return VirtualMachineMigration.model_validate({
        "apiVersion": "cumulo.io/v1alpha1", "kind": "VirtualMachineMigration",
        "metadata": {"name": f"m-{vm}-{created}", "namespace": "t", "creationTimestamp": stamp.isoformat()},
        "spec": {"virtualMachine": {"name": vm}},
        "status": {"phase": phase, "sourceHost": source, "reason": reason, "message": message}})


def test_evacuation_migrates_each_guest_once_and_names_those_that_cannot_move():
    guests = [_vm("a"), _vm("b"), _vm("c"), _vm("d", migrating=True)]
    migrations = [_migration("b", "Migrating", 1),
                  _migration("c", "Succeeded", 1), _migration("c", "Failed", 2, reason="NoMatchingHost",
                                                                         message="pinned to h1")]
    plan_ = migration.evacuation("h1", guests, migrations)
    assert plan_.to_migrate == (("t", "a"),)
    assert plan_.unmovable == (("t/c", "NoMatchingHost: pinned to h1"),)
    assert plan_.moving == 2  # b's migration and d, moved by someone else's
    assert migration.maintenance_state(True, 4, plan_) == ResourceState.PREPARE_FOR_MAINTENANCE
    stuck = migration.evacuation("h1", [_vm("c")], migrations)
    assert migration.maintenance_state(True, 1, stuck) == ResourceState.ERROR_IN_MAINTENANCE
    assert migration.maintenance_state(True, 0, stuck) == ResourceState.MAINTENANCE
    assert migration.maintenance_state(False, 3, stuck) is None


def test_the_destination_xml_points_at_the_target_files_and_names_the_target_host():
    owner = DomainOwner(namespace="t", name="web", uid="u", host="h1")
    description = DomainDescription(
        uuid="u", name="t_web", owner=owner, cpus=1, memory_mib=128, cpu_shares=1024,
        disks=(DiskDevice(volume="web-root", path="/pools/h1/u1.qcow2", target="vda"),
               DiskDevice(volume="web-data", path="/mnt/shared/u2.qcow2", target="vdb")),
        config_drive="/state1/vms/u/config-drive.iso", console_log="/state1/vms/u/console.log")
    source = domainxml.render(description)
    # libvirt adds the backing chain of an active domain; a whole-image copy has none.
    root = ET.fromstring(source)
    ET.SubElement(root.find("devices/disk"), "backingStore", type="file")
    xml = domainxml.migration_xml(ET.tostring(root, encoding="unicode"), host="h2",
                                  disks={"/pools/h1/u1.qcow2": "/pools/h2/u1.qcow2"},
                                  console_log="/state2/vms/u/console.log",
                                  config_drive="/state2/vms/u/config-drive.iso")
    owner_after, disks, console = domainxml.parse(xml)
    assert owner_after.host == "h2" and owner_after.uid == "u"
    assert [(d.volume, d.path) for d in disks] == [("web-root", "/pools/h2/u1.qcow2"),
                                                   ("web-data", "/mnt/shared/u2.qcow2"),
                                                   ("", "/state2/vms/u/config-drive.iso")]
    assert console == "/state2/vms/u/console.log"
    assert ET.fromstring(xml).find("devices/disk/backingStore") is None


def test_the_simulator_moves_a_domain_to_its_peer_or_fails_as_injected():
    faults = FaultInjector()
    source = SimulatorDriver(SimulatedCapacity(), faults, version="1", host="sim-a", disk_sizes={"/a/d": GIB})
    target = SimulatorDriver(SimulatedCapacity(), FaultInjector(), version="1", host="sim-b")
    try:
        owner = DomainOwner(namespace="t", name="web", uid="u", host="sim-a")

        async def scenario() -> tuple[Domain | None, Domain | None, Domain | None]:
            await source.start(DomainDescription(uuid="u", name="t_web", owner=owner, cpus=1, memory_mib=64,
                                                 cpu_shares=1, disks=(DiskDevice("web-root", "/a/d", "vda"),)))
            plan_ = MigrationTarget(host="sim-b", address=None, disks={"/a/d": "/b/d"}, shared_storage=False)
            faults.configure({"migrate": Fault(fail=True, message="injected")})
            with pytest.raises(HypervisorError, match="injected"):
                await source.migrate("u", plan_)
            assert await source.domain("u") is not None and await target.domain("u") is None
            faults.configure({})
            await source.migrate("u", plan_)
            with pytest.raises(HypervisorError, match="not in this agent process"):
                await target.migrate("u", MigrationTarget(host="elsewhere", address=None))
            return await source.domain("u"), await target.domain("u"), await target.domain("u")

        here, there, seen = asyncio.run(scenario())
        assert here is None and there is not None and seen == there
        assert there.owner.host == "sim-b" and [d.path for d in there.disks] == ["/b/d"]
        assert target.disk_sizes == {"/b/d": GIB}
    finally:
        PEERS.pop("sim-a", None)
        PEERS.pop("sim-b", None)


def test_the_sweep_keeps_a_domain_arriving_by_migration():
    owner = DomainOwner(namespace="t", name="web", uid="u", host="h2")
    vm = {"metadata": {"uid": "u", "name": "web", "namespace": "t"},
          "status": {"launch": {"host": "h1"}, "migration": {"name": "m", "sourceHost": "h1", "targetHost": "h2"}}}
    assert vmspec.domain_verdict(owner, vm)[0] == vmspec.Verdict.KEEP
    assert not vmspec.migrating(vm)
    vm["status"]["migration"]["migrating"] = True
    assert vmspec.migrating(vm)
    del vm["status"]["migration"]
    assert vmspec.domain_verdict(owner, vm)[0] == vmspec.Verdict.DESTROY
