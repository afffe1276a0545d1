"""The agent's Template, Volume and VirtualMachine reconcilers against an in-memory API, with the simulator
hypervisor and storage drivers, or the filesystem storage driver with a fake qemu-img."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import types
import typing as t
from collections.abc import Sequence
from pathlib import Path

import pytest

from hostagent.config import AgentConfig
from hostagent.drivers.hypervisor import DiskDevice, DomainDescription, DomainOwner, HypervisorError
from hostagent.drivers.hypervisor.simulator import SimulatedCapacity, SimulatorDriver
from hostagent.drivers.network.simulator import SimulatorNetworkDriver
from hostagent.drivers.storage import BaseImageRef
from hostagent.drivers.storage.filesystem import FilesystemStorageDriver
from hostagent.drivers.storage.simulator import SimulatorStorageDriver
from hostagent.executor import CommandResult
from hostagent.faults import Fault, FaultInjector
from hostagent.heartbeat import Heartbeat
from hostagent.kube import ApiHealth, KubeError
from hostagent.templates import TemplateReconciler, template_action
from hostagent.vms import VmReconciler
from hostagent.volumes import VolumeReconciler, disk_report

UID = "aaaaaaaa-0000-4000-8000-000000000001"


class FakeApi:
    """Records requests; GETs answer from ``objects`` (path → object, or a KubeError to raise)."""

    def __init__(self) -> None:
        self.kube = None
        self.health = ApiHealth()
        self.requests: list[tuple[str, str, t.Any]] = []
        self.objects: dict[str, t.Any] = {}

    async def request(self, method: str, path: str, *, body: t.Any = None, **_: t.Any) -> t.Any:
        self.requests.append((method, path, copy.deepcopy(body)))
        if method == "GET":
            answer = self.objects.get(path)
            if isinstance(answer, KubeError):
                raise answer
            if answer is None:
                raise KubeError(404, "NotFound", "not found")
            return answer
        return {}

    def patches(self, path_part: str = "") -> list[t.Any]:
        return [body for method, path, body in self.requests if method == "PATCH" and path_part in path]


def make_agent(tmp_path: Path, *, storage: t.Any = None, hosts: Sequence[str] = ("h1",),
               stop_seconds: float = 0.0) -> types.SimpleNamespace:
    faults = FaultInjector()
    sizes: dict[str, int] = {}
    config = AgentConfig(hosts=list(hosts), hypervisor="simulator", state_dir=str(tmp_path / "state"))
    workers = {}
    for host in hosts:
        hypervisor = SimulatorDriver(SimulatedCapacity(), faults, version="1", call_timeout=1,
                                     stop_seconds=stop_seconds, disk_sizes=sizes)
        host_storage = storage or SimulatorStorageDriver(faults, capacity_bytes=1 << 40, disk_sizes=sizes)

        async def storage_for(pool: t.Any, rbd: t.Any, host_storage: t.Any = host_storage) -> t.Any:
            return host_storage  # a simulated host: one storage for every pool type

        workers[host] = types.SimpleNamespace(
            name=host, hypervisor=hypervisor, facts=None, network=SimulatorNetworkDriver(),
            storage=host_storage, storage_for=storage_for)
    agent = types.SimpleNamespace(config=config, api=FakeApi(), workers=workers, faults=faults, sizes=sizes,
                                  rbd_pools=None)
    agent.volumes = VolumeReconciler(agent)
    agent.vms = VmReconciler(agent)
    return agent


def apply_status(obj: dict, patch: dict) -> None:
    """Apply a status merge patch the way the apiserver does (one level of keys under the status key)."""
    for key, value in patch["status"].items():
        if value is None:
            obj.setdefault("status", {}).pop(key, None)
            continue
        current = dict(obj.setdefault("status", {}).get(key) or {})
        for field, item in value.items():
            if item is None:
                current.pop(field, None)
            else:
                current[field] = item
        obj["status"][key] = current


# -- VirtualMachines --------------------------------------------------------------------------------------


def vm_object(power: str = "Running", disks: Sequence[dict] = (), host: str = "h1", uid: str = UID) -> dict:
    root = {"volume": "web-root", "device": "vda", "pool": "p", "poolType": "Filesystem", "path": "/p/root.qcow2",
            "sizeBytes": 1 << 30}
    return {
        "metadata": {"name": "web", "namespace": "ns", "uid": uid, "resourceVersion": "7",
                     "labels": {"cumulo.io/host": host}},
        "status": {"launch": {"host": host, "cpuNumber": 1, "cpuSpeedMHz": 500, "memoryMiB": 128, "hostname": "web",
                              "disks": [root, *disks], "powerState": power}},
    }


def data_disk(name: str) -> dict:
    return {"volume": name, "device": "vdb", "pool": "p", "poolType": "Filesystem", "path": f"/p/{name}.qcow2",
            "sizeBytes": 1 << 30}


async def vm_round(reconciler: VmReconciler, vm: dict) -> float | None:
    """One reconcile of the cached ``vm``, then its report applied to it (as the watch would deliver)."""
    reconciler.informer.cache["ns/web"] = vm
    before = len(reconciler.agent.api.patches())
    delay = await reconciler.reconcile("ns/web", vm)
    for patch in reconciler.agent.api.patches()[before:]:
        apply_status(vm, patch)
    return delay


def test_vm_starts_reports_once_and_adopts(tmp_path):
    async def main() -> None:
        agent = make_agent(tmp_path)
        reconciler = VmReconciler(agent)
        vm = vm_object()
        assert await vm_round(reconciler, vm) is None
        domain = await agent.workers["h1"].hypervisor.domain(UID)
        assert domain is not None and domain.name == "ns_web-aaaaaaaa" and domain.owner.host == "h1"
        node = vm["status"]["node"]
        assert node["domainState"] == "running" and node["domainUuid"] == UID and node["host"] == "h1"
        assert node["disks"] == ["web-root"] and node["message"] == "" and node["startedAt"]
        assert "consoleLog" not in node  # the simulator writes no files
        assert agent.api.patches() == [{"status": {"node": node}}]
        # Level-based: more rounds change nothing and write nothing.
        for _ in range(3):
            await vm_round(reconciler, vm)
        assert len(agent.api.patches()) == 1
        assert (await agent.workers["h1"].hypervisor.domain(UID)).id == domain.id

        # A new reconciler (a restarted agent) adopts the running domain: no restart, no write.
        fresh = VmReconciler(agent)
        await vm_round(fresh, vm)
        assert (await agent.workers["h1"].hypervisor.domain(UID)).id == domain.id
        assert len(agent.api.patches()) == 1

    asyncio.run(main())


def test_vm_stop_retries_acpi_then_reports_shutoff(tmp_path):
    async def main() -> None:
        agent = make_agent(tmp_path, stop_seconds=0.15)
        reconciler = VmReconciler(agent, shutdown_retry_seconds=0.05)
        vm = vm_object()
        await vm_round(reconciler, vm)
        vm["status"]["launch"]["powerState"] = "Stopped"
        delay = await vm_round(reconciler, vm)
        assert delay == 1.0 and vm["status"]["node"]["domainState"] == "stopping"
        await asyncio.sleep(0.2)
        assert await vm_round(reconciler, vm) is None
        assert vm["status"]["node"] == {"host": "h1", "domainState": "shutoff", "message": "", "disks": []}
        assert await agent.workers["h1"].hypervisor.domain(UID) is None

    asyncio.run(main())


def test_vm_stop_destroys_a_guest_ignoring_acpi_after_the_timeout(tmp_path):
    async def main() -> None:
        agent = make_agent(tmp_path, stop_seconds=60)  # the guest never acts on the power button in time
        reconciler = VmReconciler(agent, stop_timeout=0.1, shutdown_retry_seconds=0.02)
        vm = vm_object()
        await vm_round(reconciler, vm)
        vm["status"]["launch"]["powerState"] = "Stopped"
        await vm_round(reconciler, vm)
        await asyncio.sleep(0.15)
        await vm_round(reconciler, vm)
        assert vm["status"]["node"]["domainState"] == "shutoff"
        assert await agent.workers["h1"].hypervisor.domain(UID) is None
        await agent.workers["h1"].hypervisor.close()

    asyncio.run(main())


def test_vm_hotplugs_data_disks(tmp_path):
    async def main() -> None:
        agent = make_agent(tmp_path)
        reconciler = VmReconciler(agent)
        vm = vm_object()
        await vm_round(reconciler, vm)
        vm = vm_object(disks=[data_disk("d1"), data_disk("d2")]) | {"status": {**vm["status"], "launch": vm_object(
            disks=[data_disk("d1"), data_disk("d2")])["status"]["launch"]}}
        await vm_round(reconciler, vm)
        domain = await agent.workers["h1"].hypervisor.domain(UID)
        assert [(d.volume, d.target) for d in domain.disks] == [("web-root", "vda"), ("d1", "vdb"), ("d2", "vdc")]
        assert vm["status"]["node"]["disks"] == ["d1", "d2", "web-root"]
        vm["status"]["launch"]["disks"] = vm["status"]["launch"]["disks"][:2]  # d2 removed
        await vm_round(reconciler, vm)
        assert vm["status"]["node"]["disks"] == ["d1", "web-root"]

    asyncio.run(main())


def test_vm_start_failure_is_reported_and_retried_with_backoff(tmp_path):
    async def main() -> None:
        agent = make_agent(tmp_path)
        agent.faults.configure({"start": Fault(fail=True, message="simulated: no memory")})
        reconciler = VmReconciler(agent)
        vm = vm_object()
        delays = [await vm_round(reconciler, vm) for _ in range(3)]
        assert delays[0] > 0 and delays[2] > delays[0]  # exponential backoff
        assert vm["status"]["node"]["message"] == "simulated: no memory"
        assert vm["status"]["node"]["domainState"] == "shutoff"
        assert len(agent.api.patches()) == 1  # a stable message is written once
        agent.faults.configure({})
        assert await vm_round(reconciler, vm) is None
        assert vm["status"]["node"]["message"] == "" and vm["status"]["node"]["domainState"] == "running"

    asyncio.run(main())


def test_vm_state_is_unknown_when_the_hypervisor_does_not_answer(tmp_path):
    async def main() -> None:
        agent = make_agent(tmp_path)
        reconciler = VmReconciler(agent)
        vm = vm_object()
        await vm_round(reconciler, vm)

        async def broken(uuid: str) -> None:
            raise HypervisorError("libvirt domain lookup failed: connection reset")

        agent.workers["h1"].hypervisor.domain = broken
        await vm_round(reconciler, vm)
        # Never "shutoff": the controller would take the guest for stopped and release its placement.
        assert vm["status"]["node"]["domainState"] == "unknown"
        assert vm["status"]["node"]["message"] == "libvirt domain lookup failed: connection reset"

    asyncio.run(main())


def test_a_guest_that_powers_itself_off_is_restarted_with_backoff_when_it_keeps_doing_so(tmp_path):
    async def main() -> None:
        agent = make_agent(tmp_path)
        hypervisor = agent.workers["h1"].hypervisor
        reconciler = VmReconciler(agent)
        vm = vm_object()
        await vm_round(reconciler, vm)
        first = (await hypervisor.domain(UID)).id
        reconciler._starts["ns/web"].at -= 120  # it ran for two minutes, then the guest powered off
        await hypervisor.destroy(UID)
        assert await vm_round(reconciler, vm) is None  # started again at once
        second = (await hypervisor.domain(UID)).id
        assert second != first and vm["status"]["node"]["message"] == ""
        await hypervisor.destroy(UID)  # ...and off again right away: a quick stop
        delay = await vm_round(reconciler, vm)
        assert 4 < delay <= 5 and await hypervisor.domain(UID) is None
        assert vm["status"]["node"]["message"] == ("the guest stopped by itself soon after starting; starting it "
                                                   "again with backoff")
        assert vm["status"]["node"]["domainState"] == "shutoff"
        reconciler._starts["ns/web"].restart_at -= 5  # the delay has passed
        assert await vm_round(reconciler, vm) is None
        assert (await hypervisor.domain(UID)).id not in (first, second)
        assert vm["status"]["node"]["message"] == "" and vm["status"]["node"]["domainState"] == "running"

    asyncio.run(main())


def test_vm_of_another_host_is_left_alone(tmp_path):
    async def main() -> None:
        agent = make_agent(tmp_path)
        reconciler = VmReconciler(agent)
        assert await vm_round(reconciler, vm_object(host="h2")) is None
        assert agent.api.requests == [] and await agent.workers["h1"].hypervisor.domains() == []

    asyncio.run(main())


def test_after_the_lease_lapsed_a_start_from_the_cache_is_confirmed_first(tmp_path):
    """An agent that was paused (or cut off) past its Lease could not fence: the controller may have restarted
    its guest elsewhere, and the first reconcile after the thaw may still see the old placement in the cache.
    The start waits for a direct GET; a guest placed elsewhere is neither started nor reported on."""
    async def main() -> None:
        agent = make_agent(tmp_path)
        worker = agent.workers["h1"]
        worker.storage_heartbeat = types.SimpleNamespace(fenced=False, confirm_starts=False)
        worker.heartbeat = heartbeat = Heartbeat(agent.api, "h1", interval=1, duration=4)
        reconciler = VmReconciler(agent)
        heartbeat._renewed()
        assert not heartbeat.lapsed()  # a first renewal, however late, is no lapse
        heartbeat.last_ok -= 10  # paused for 10 s: expired now
        assert heartbeat.lapsed()
        path = "/apis/cumulo.io/v1alpha1/namespaces/ns/virtualmachines/web"
        agent.api.objects[path] = vm_object(host="h2")
        stale = vm_object()  # the cache: still placed here
        assert await vm_round(reconciler, stale) is None
        assert await worker.hypervisor.domains() == [] and agent.api.patches() == []
        assert [(m, p) for m, p, _ in agent.api.requests] == [("GET", path)]
        heartbeat._renewed()  # renewed again: the cache may still lag, so starts keep confirming
        assert heartbeat.lapsed() and heartbeat.lapsed_once
        assert await vm_round(reconciler, stale) is None and await worker.hypervisor.domains() == []
        agent.api.objects[path] = vm_object()  # the API says here: started
        await vm_round(reconciler, vm_object())
        assert [d.uuid for d in await worker.hypervisor.domains()] == [UID]

    asyncio.run(main())


def test_a_lease_renewed_in_time_never_counts_as_lapsed():
    heartbeat = Heartbeat(None, "h1", interval=1, duration=4)  # type: ignore[arg-type]
    heartbeat.last_ok -= 100  # the Host appeared late: the first renewal is no lapse
    heartbeat._renewed()
    heartbeat._renewed()
    assert not heartbeat.lapsed() and not heartbeat.lapsed_once


def test_sweep_destroys_only_confirmed_orphans(tmp_path):
    async def start(hypervisor: SimulatorDriver, name: str, uid: str, host: str = "h1") -> None:
        owner = DomainOwner(namespace="ns", name=name, uid=uid, host=host)
        await hypervisor.start(DomainDescription(uuid=uid, name=f"ns_{name}", owner=owner, cpus=1, memory_mib=128,
                                                 cpu_shares=500))

    async def main() -> None:
        agent = make_agent(tmp_path)
        hypervisor = agent.workers["h1"].hypervisor
        reconciler = VmReconciler(agent)
        path = "/apis/cumulo.io/v1alpha1/namespaces/ns/virtualmachines/{}"
        await start(hypervisor, "web", UID)              # cached, placed here: adopted
        await start(hypervisor, "gone", "u-gone")        # 404: destroyed
        await start(hypervisor, "moved", "u-moved")      # placed on h2: destroyed
        await start(hypervisor, "lag", "u-lag")          # the cache lags, the API says here: kept
        await start(hypervisor, "unsure", "u-unsure")    # the API does not answer: kept
        await start(hypervisor, "other", "u-other", host="h9")  # another agent's: never looked at
        reconciler.informer.cache["ns/web"] = vm_object()
        moved = vm_object(host="h2", uid="u-moved")
        moved["metadata"]["name"] = "moved"
        lag = vm_object(uid="u-lag")
        lag["metadata"]["name"] = "lag"
        agent.api.objects[path.format("moved")] = moved
        agent.api.objects[path.format("lag")] = lag
        agent.api.objects[path.format("unsure")] = KubeError(503, "ServiceUnavailable", "etcd leader change")
        await reconciler.sweep()
        assert sorted(d.name for d in await hypervisor.domains()) == ["ns_lag", "ns_other", "ns_unsure", "ns_web"]
        gets = sorted(path for method, path, _ in agent.api.requests if method == "GET")
        assert gets == sorted(path.format(name) for name in ("gone", "moved", "lag", "unsure"))
        assert len(reconciler.queue) == 2  # web (adopted) and lag (its reconcile takes over once cached)

    asyncio.run(main())


def test_the_state_check_queues_only_guests_whose_domain_is_out_of_step(tmp_path):
    """Between full resyncs, one listing of the host's domains decides which guests need a reconcile: one that
    powered itself off or lost a disk is queued, guests in step are not, and later sweeps no longer queue every
    running guest."""
    async def main() -> None:
        agent = make_agent(tmp_path)
        hypervisor = agent.workers["h1"].hypervisor
        reconciler = agent.vms
        guests = {}
        for index in range(3):
            vm = vm_object(uid=f"u-{index}", disks=[data_disk(f"data-{index}")])
            vm["metadata"]["name"] = f"web{index}"
            key = f"ns/web{index}"
            reconciler.informer.cache[key] = vm
            await reconciler.reconcile(key, vm)
            for patch in agent.api.patches()[-1:]:
                apply_status(vm, patch)
            guests[key] = vm
        await reconciler.sweep()  # the first sweep adopts every running guest
        assert len(reconciler.queue) == 3
        reconciler.queue = type(reconciler.queue)("VirtualMachine", reconciler._handle)
        reconciler.swept.set()  # as the sweep loop does after the first sweep
        await reconciler.check_states()
        assert len(reconciler.queue) == 0  # all in step: nothing to do
        await reconciler.sweep()
        assert len(reconciler.queue) == 0
        await hypervisor.destroy("u-1")  # powered itself off
        await hypervisor.detach_disk("u-2", DiskDevice(volume="data-2", path="/p/data-2.qcow2", target="vdb"))  # lost a disk behind the agent's back
        await reconciler.check_states()
        assert sorted(key for key in guests if key in reconciler.queue._due) == ["ns/web1", "ns/web2"]

    asyncio.run(main())


def test_a_start_waits_silently_for_the_root_disk_this_agent_is_creating(tmp_path):
    """The controller writes the launch with the placement; the domain starts once this agent's volume worker
    has created the disk, and nothing is reported meanwhile (no failure, no extra write)."""
    async def main() -> None:
        agent = make_agent(tmp_path)
        reconciler = agent.vms
        root = {"metadata": {"name": "web-root", "namespace": "ns", "uid": "r1", "labels": {"cumulo.io/host": "h1"}},
                "spec": {"virtualMachine": {"name": "web"}},
                "status": {"host": "h1", "path": "/p/root.qcow2", "sizeBytes": 1 << 30, "storagePool": "p"}}
        agent.volumes.informer.cache["ns/web-root"] = root
        vm = vm_object()
        assert await vm_round(reconciler, vm) is None
        assert await agent.workers["h1"].hypervisor.domain(UID) is None and agent.api.patches() == []
        assert "ns/web" not in reconciler.queue._due

        await agent.volumes.reconcile("ns/web-root", root)  # creates the disk, reports it, wakes the guest
        assert "ns/web" in reconciler.queue._due
        assert agent.api.patches()[-1]["status"]["node"]["exists"] is True
        await vm_round(reconciler, vm)
        domain = await agent.workers["h1"].hypervisor.domain(UID)
        assert domain is not None and domain.active and vm["status"]["node"]["domainState"] == "running"
        assert len(agent.api.patches()) == 2  # the disk's report and the guest's: nothing else

    asyncio.run(main())


# -- Volumes ------------------------------------------------------------------------------------------------


def volume_object(size: int = 1 << 30, deleting: bool = False, base: dict | None = None) -> dict:
    metadata: dict[str, t.Any] = {"name": "data", "namespace": "ns", "uid": "v1", "labels": {"cumulo.io/host": "h1"}}
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status: dict[str, t.Any] = {"host": "h1", "path": "/pool/v1.qcow2", "sizeBytes": size, "storagePool": "p"}
    if base:
        status["baseImage"] = base
    return {"metadata": metadata, "status": status}


async def volume_round(reconciler: VolumeReconciler, volume: dict) -> float | None:
    reconciler.informer.cache["ns/data"] = volume
    before = len(reconciler.agent.api.patches())
    delay = await reconciler.reconcile("ns/data", volume)
    for patch in reconciler.agent.api.patches()[before:]:
        apply_status(volume, patch)
    return delay


def test_volume_created_grown_offline_and_live_then_deleted(tmp_path):
    async def main() -> None:
        agent = make_agent(tmp_path)
        reconciler = VolumeReconciler(agent)
        volume = volume_object()
        await volume_round(reconciler, volume)
        assert volume["status"]["node"] == {"exists": True, "sizeBytes": 1 << 30, "physicalSizeBytes": 0,
                                            "message": ""}
        volume["status"]["sizeBytes"] = 2 << 30
        await volume_round(reconciler, volume)  # no domain uses it: offline resize
        assert volume["status"]["node"]["sizeBytes"] == 2 << 30
        owner = DomainOwner(namespace="ns", name="web", uid=UID, host="h1")
        hypervisor = agent.workers["h1"].hypervisor
        await hypervisor.start(DomainDescription(uuid=UID, name="ns_web", owner=owner, cpus=1, memory_mib=128,
                                                 cpu_shares=1, disks=(DiskDevice("data", "/pool/v1.qcow2", "vdb"),)))
        agent.faults.configure({"resize": Fault(fail=True, message="simulated: live resize failed")})
        volume["status"]["sizeBytes"] = 3 << 30
        assert await volume_round(reconciler, volume) > 0
        assert volume["status"]["node"]["message"] == "cannot grow the disk: simulated: live resize failed"
        agent.faults.configure({})
        assert await volume_round(reconciler, volume) is None
        assert volume["status"]["node"] == {"exists": True, "sizeBytes": 3 << 30, "physicalSizeBytes": 0,
                                            "message": ""}
        volume["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        assert await volume_round(reconciler, volume) > 0  # still used by a running domain: not deleted
        assert volume["status"]["node"]["message"] == "not deleting the disk: domain ns_web still uses it"
        assert agent.sizes
        await hypervisor.destroy(UID)
        await volume_round(reconciler, volume)
        assert volume["status"]["node"] == {"exists": False, "message": ""}
        assert agent.sizes == {}

    asyncio.run(main())


def test_volume_create_fault_is_reported(tmp_path):
    async def main() -> None:
        agent = make_agent(tmp_path)
        agent.faults.configure({"create-volume": Fault(fail=True, message="simulated: pool full")})
        reconciler = VolumeReconciler(agent)
        volume = volume_object()
        await volume_round(reconciler, volume)
        assert volume["status"]["node"] == {"exists": False, "message": "cannot create the disk: simulated: pool full"}

    asyncio.run(main())


def test_physical_size_moves_are_not_worth_a_write_below_the_tolerance():
    from hostagent.drivers.storage import DiskState

    previous = {"exists": True, "sizeBytes": 1 << 30, "physicalSizeBytes": 100 << 20, "message": ""}
    assert disk_report(DiskState(1 << 30, (100 << 20) + 4096, "qcow2"), "", previous) == previous
    assert disk_report(DiskState(1 << 30, 200 << 20, "qcow2"), "", previous)["physicalSizeBytes"] == 200 << 20


class FakeQemuImg:
    """A qemu-img that keeps a JSON description in each 'image' file."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    async def run(self, argv: Sequence[str], *, timeout: float = 120.0) -> CommandResult:
        argv = tuple(argv)
        self.calls.append(argv)
        command, path = argv[1], argv[-1]
        if command == "create":
            path, size = argv[-2], int(argv[-1])
            backing = argv[argv.index("-b") + 1] if "-b" in argv else None
            Path(path).write_text(json.dumps({"format": "qcow2", "virtual-size": size, "actual-size": 196608,
                                              "backing-filename": backing}))
        elif command == "resize":
            path, size = argv[-2], int(argv[-1])
            data = json.loads(Path(path).read_text())
            Path(path).write_text(json.dumps({**data, "virtual-size": size}))
        elif command == "info":
            return CommandResult(argv, 0, Path(path).read_text(), "")
        return CommandResult(argv, 0, "", "")


def test_filesystem_overlays_share_one_base_copy(tmp_path):
    async def main() -> None:
        executor = FakeQemuImg()
        storage = FilesystemStorageDriver(executor=executor)
        source = tmp_path / "store" / "t.qcow2"
        source.parent.mkdir()
        source.write_text(json.dumps({"format": "qcow2", "virtual-size": 5 << 30, "actual-size": 1}))
        base = BaseImageRef(source=str(source), path=str(tmp_path / "pool" / "templates" / "t.qcow2"))
        pool = tmp_path / "pool"
        await asyncio.gather(*(storage.create_disk(str(pool / f"v{index}.qcow2"), 1 << 30, base)
                               for index in range(3)))
        assert Path(base.path).read_text() == source.read_text()
        for index in range(3):
            state = await storage.disk_info(str(pool / f"v{index}.qcow2"))
            assert state.virtual_size == 5 << 30  # never smaller than the base image
        creates = [call for call in executor.calls if call[1] == "create"]
        assert len(creates) == 3 and all(call[-2].endswith(".creating") for call in creates)
        assert all(("-F", "qcow2", "-b", base.path) == call[5:9] for call in creates)
        assert sorted(p.name for p in pool.iterdir()) == ["templates", "v0.qcow2", "v1.qcow2", "v2.qcow2"]
        assert sorted(p.name for p in (pool / "templates").iterdir()) == ["t.qcow2", "t.qcow2.lock"]
        await storage.delete_disk(str(pool / "v0.qcow2"))
        assert not (pool / "v0.qcow2").exists() and Path(base.path).exists()
        await storage.close()

    asyncio.run(main())


def test_filesystem_missing_template_image(tmp_path):
    async def main() -> None:
        storage = FilesystemStorageDriver(executor=FakeQemuImg())
        base = BaseImageRef(source=str(tmp_path / "missing.qcow2"), path=str(tmp_path / "pool" / "b.qcow2"))
        from hostagent.drivers.storage import StorageError

        with pytest.raises(StorageError, match="template image .*missing.qcow2 does not exist"):
            await storage.create_disk(str(tmp_path / "pool" / "v.qcow2"), 1 << 30, base)
        assert not (tmp_path / "pool" / "v.qcow2").exists()

    asyncio.run(main())


# -- Templates -----------------------------------------------------------------------------------------------


def template_object(state: str = "Downloading", host: str = "h1", download: dict | None = None,
                    deleting: bool = False, path: str = "/store/t.qcow2", url: str = "file:///src/t.qcow2") -> dict:
    metadata: dict[str, t.Any] = {"name": "t", "namespace": "ns", "uid": "t1", "labels": {"cumulo.io/host": host}}
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status: dict[str, t.Any] = {"zones": [{"zone": "z1", "imageStore": "s", "path": path, "host": host,
                                           "state": state}]}
    if download:
        status["download"] = download
    return {"metadata": metadata, "spec": {"url": url, "format": "QCOW2"}, "status": status}


def test_template_actions():
    mine = {"h1"}
    assert template_action(template_object(), mine).kind == "download"
    assert template_action(template_object(host="h2"), mine).kind == "idle"
    assert template_action(template_object(state="Ready"), mine).kind == "idle"
    error = {"zone": "z1", "host": "h1", "state": "Error", "message": "checksum mismatch"}
    assert template_action(template_object(download=error), mine).kind == "wait"  # the controller takes it in
    ready = {"zone": "z1", "host": "h1", "state": "Ready"}
    assert template_action(template_object(download=ready), mine, file_exists=lambda p: True).kind == "wait"
    assert template_action(template_object(download=ready), mine, file_exists=lambda p: False).kind == "download"
    other = {"zone": "z1", "host": "h2", "state": "Ready"}  # another host did it before the copy moved here
    assert template_action(template_object(download=other), mine).kind == "download"
    downloading = {"zone": "z1", "host": "h1", "state": "Downloading", "percent": 40}  # a restarted agent
    assert template_action(template_object(download=downloading), mine).kind == "download"
    delete = template_action(template_object(state="Ready", deleting=True), mine)
    assert delete.kind == "delete" and delete.report.zone == "z1" and [c.path for c in delete.copies] == ["/store/t.qcow2"]
    deleted = {"zone": "z1", "host": "h1", "state": "Ready", "deleted": True}
    assert template_action(template_object(state="Ready", deleting=True, download=deleted), mine).report is None


def test_template_download_reports_progress_then_ready_and_deletion_removes_files(tmp_path):
    async def main() -> None:
        source = tmp_path / "src" / "t.qcow2"
        source.parent.mkdir()
        source.write_bytes(os.urandom(3 << 20))
        target = tmp_path / "store" / "templates" / "t.qcow2"

        class Executor:
            async def run(self, argv: Sequence[str], *, timeout: float = 120.0) -> CommandResult:
                await asyncio.sleep(1.3)  # a slow probe: one progress report in between
                return CommandResult(tuple(argv), 0, json.dumps({"format": "qcow2", "virtual-size": 10 << 20}), "")

        agent = make_agent(tmp_path, storage=FilesystemStorageDriver(executor=Executor()))
        reconciler = TemplateReconciler(agent)
        template = template_object(path=str(target), url=source.as_uri())
        reconciler.informer.cache["ns/t"] = template
        await reconciler.reconcile("ns/t", template)
        assert "ns/t" in reconciler.downloads
        await reconciler.reconcile("ns/t", template)  # a second event does not start a second download
        task = reconciler.downloads["ns/t"].task
        await task
        reports = [patch["status"]["download"] for patch in agent.api.patches("/templates/t/status")]
        assert reports[0] == {"zone": "z1", "host": "h1", "state": "Downloading", "bytes": 0, "message": "",
                              "deleted": False}  # no percent before the size is known
        assert reports[-1]["state"] == "Ready" and reports[-1]["detectedFormat"] == "QCOW2"
        assert reports[-1]["virtualSizeBytes"] == 10 << 20 and reports[-1]["physicalSizeBytes"] == 3 << 20
        assert reports[-1]["checksum"].startswith("sha256:") and reports[-1]["percent"] == 100
        assert len(reports) <= 3
        assert target.read_bytes() == source.read_bytes()

        # Deleted: the copy's files go, and the zone is reported deleted.
        deleting = template_object(state="Ready", deleting=True, path=str(target), url=source.as_uri(),
                                   download={"zone": "z1", "host": "h1", "state": "Ready"})
        Path(f"{target}.kernel").write_bytes(b"k")
        reconciler.informer.cache["ns/t"] = deleting
        await reconciler.reconcile("ns/t", deleting)
        assert not target.exists() and not Path(f"{target}.kernel").exists()
        assert agent.api.patches()[-1] == {"status": {"download": {"zone": "z1", "host": "h1", "state": "Ready",
                                                                   "deleted": True}}}

    asyncio.run(main())


def test_template_download_error_from_the_simulator(tmp_path):
    async def main() -> None:
        agent = make_agent(tmp_path)
        agent.faults.configure({"download": Fault(fail=True, message="simulated: store unreachable")})
        reconciler = TemplateReconciler(agent)
        template = template_object()
        reconciler.informer.cache["ns/t"] = template
        await reconciler.reconcile("ns/t", template)
        await reconciler.downloads["ns/t"].task
        report = agent.api.patches()[-1]["status"]["download"]
        assert report["state"] == "Error" and report["message"] == "simulated: store unreachable"

    asyncio.run(main())


def test_label_selectors_of_the_agents_hosts():
    from hostagent.reconciler import MAX_SELECTOR_LENGTH, host_selector

    assert host_selector(["kvm1"]) == "cumulo.io/host=kvm1"
    assert host_selector(["s-0", "s-1", "s-2"]) == "cumulo.io/host in (s-0,s-1,s-2)"
    many = [f"simulated-host-{index}" for index in range(MAX_SELECTOR_LENGTH // 10)]
    assert host_selector(many) == "cumulo.io/host"  # too long for a URL: every bound object, filtered here


# -- User data from a Secret ------------------------------------------------------------------------------

SECRET_PATH = "/api/v1/namespaces/ns/secrets/web-userdata"
USER_DATA = b"#cloud-config\nchpasswd: {list: 'root:sup3r-s3cret'}\n"


def secret_vm(tmp_path: Path) -> dict:
    """A guest whose launch refers to a user data Secret, with disk files a file-backed host can find."""
    root = tmp_path / "root.qcow2"
    root.write_bytes(b"")
    vm = vm_object()
    vm["status"]["launch"]["disks"][0]["path"] = str(root)
    vm["status"]["launch"]["userDataSecret"] = {"namespace": "ns", "name": "web-userdata", "key": "userdata"}
    return vm


class FileBackedSimulator(SimulatorDriver):
    """A simulated host whose domains read this host's files: the agent prepares console and config drive."""

    local_files = True


def test_user_data_secret_goes_into_the_config_drive_only(tmp_path, caplog):
    import base64
    import hashlib

    from hostagent import configdrive

    async def main() -> None:
        agent = make_agent(tmp_path)
        agent.workers["h1"].hypervisor = FileBackedSimulator(SimulatedCapacity(), agent.faults, version="1")
        agent.api.objects[SECRET_PATH] = {"data": {"userdata": base64.b64encode(USER_DATA).decode()}}
        reconciler = VmReconciler(agent)
        vm = secret_vm(tmp_path)
        with caplog.at_level("DEBUG"):
            assert await vm_round(reconciler, vm) is None
        assert vm["status"]["node"]["domainState"] == "running" and vm["status"]["node"]["message"] == ""
        assert ("GET", SECRET_PATH, None) in agent.api.requests
        drive = reconciler.files.config_drive(UID)
        assert os.stat(drive).st_mode & 0o777 == 0o600
        with open(drive, "rb") as file:
            assert configdrive.read_iso_files(file.read())["user-data"] == USER_DATA
        # Nowhere else: not in what the agent wrote to the API, nor in its log (which names the Secret and hash).
        assert b"sup3r" not in json.dumps(agent.api.requests).encode()
        assert "sup3r" not in caplog.text and "sup3r" not in repr([r.__dict__ for r in caplog.records])
        started = next(r for r in caplog.records if r.getMessage() == "domain started")
        assert started.user_data_secret == "ns/web-userdata"
        assert started.user_data_sha256 == hashlib.sha256(USER_DATA).hexdigest()

    asyncio.run(main())


@pytest.mark.parametrize("secret, message", [
    (None, "user data Secret ns/web-userdata does not exist"),
    ({"data": {"other": "eA=="}}, "user data Secret ns/web-userdata has no key 'userdata'"),
    (KubeError(403, "Forbidden", 'secrets "web-userdata" is forbidden'),
     "user data Secret ns/web-userdata cannot be read by the agent: secrets \"web-userdata\" is forbidden"),
])
def test_a_missing_user_data_secret_or_key_refuses_the_start_with_backoff(tmp_path, secret, message):
    async def main() -> None:
        agent = make_agent(tmp_path)
        if secret is not None:
            agent.api.objects[SECRET_PATH] = secret
        reconciler = VmReconciler(agent)
        vm = secret_vm(tmp_path)
        delays = [await vm_round(reconciler, vm) for _ in range(3)]
        assert delays[0] > 0 and delays[2] > delays[0]  # backoff, not a hot loop
        assert vm["status"]["node"]["message"] == message and vm["status"]["node"]["domainState"] == "shutoff"
        assert await agent.workers["h1"].hypervisor.domain(UID) is None
        # Fixed: the next start reads it and the guest runs.
        agent.api.objects[SECRET_PATH] = {"data": {"userdata": "eA=="}}
        assert await vm_round(reconciler, vm) is None
        assert vm["status"]["node"]["message"] == "" and vm["status"]["node"]["domainState"] == "running"

    asyncio.run(main())


def test_a_user_data_secret_of_another_namespace_is_not_read(tmp_path):
    async def main() -> None:
        agent = make_agent(tmp_path)
        reconciler = VmReconciler(agent)
        vm = secret_vm(tmp_path)
        vm["status"]["launch"]["userDataSecret"]["namespace"] = "other"
        await vm_round(reconciler, vm)
        assert vm["status"]["node"]["message"] == "user data Secret other/web-userdata is not in the guest's " \
                                                  "namespace ns"
        assert not [path for method, path, _ in agent.api.requests if "/secrets/" in path]

    asyncio.run(main())
