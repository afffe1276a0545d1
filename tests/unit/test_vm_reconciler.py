"""The compute reconcilers (Template, Volume, VirtualMachine) driven through the runtime against an
in-memory API, with the agents' reports written by the test."""

from __future__ import annotations

import asyncio

from fakeapi import FakeApi

from controllers import kinds, reconcilers
from controllers.api.v1alpha1.common import FINALIZER
from controllers.api.v1alpha1.host import HEARTBEAT_LABEL, HOST_LABEL
from controllers.runtime import Runtime

GIB = 2**30
API = "cumulo.io/v1alpha1"


def obj(kind, name, spec, status=None, namespace=None, **meta):
    metadata = {"name": name, **meta}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": API, "kind": kind, "metadata": metadata, "spec": spec, "status": status or {}}


def world(api: FakeApi, hosts=("h1",), cpus=2, memory=1024) -> None:
    api.put("zones", obj("Zone", "z1", {"networkType": "Advanced", "dns1": "192.0.2.1"}))
    api.put("hostpods", obj("HostPod", "p1", {"zone": "z1", "cidr": "10.0.0.0/24", "gateway": "10.0.0.1",
                                              "startIp": "10.0.0.5", "endIp": "10.0.0.9"}))
    api.put("clusters", obj("Cluster", "c1", {"pod": "p1", "hypervisorType": "KVM"}))
    api.put("imagestores", obj("ImageStore", "is1", {"zone": "z1", "path": "/images"}))
    add_hosts(api, hosts, cpus, memory)
    api.put("serviceofferings", obj("ServiceOffering", "small", {"cpuNumber": 1, "memoryMiB": 512,
                                                                 "storageType": "local"}))
    api.put("templates", obj("Template", "tiny", {"url": "file:///seed/tiny.qcow2", "format": "QCOW2"},
                             namespace="demo"))


def add_hosts(api: FakeApi, hosts, cpus=2, memory=1024) -> None:
    for host in hosts:
        node = {"hypervisorType": "KVM", "cpuCores": cpus, "memoryMiB": memory, "hypervisorHealthy": True,
                "storagePools": {f"{host}-local": {"reachable": True, "capacityBytes": 100 * GIB, "usedBytes": 0}},
                "imageStores": {"is1": {"reachable": True}}}
        api.put("hosts", obj("Host", host, {"cluster": "c1"}, {"node": node}))
        api.put("leases", {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                           "metadata": {"name": f"host-{host}", "namespace": "cumulo-system",
                                        "labels": {HEARTBEAT_LABEL: host, HOST_LABEL: host}},
                           "spec": {"renewTime": "2026-01-01T00:00:00.000000Z", "leaseDurationSeconds": 3600}})
        api.put("storagepools", obj("StoragePool", f"{host}-local", {"zone": "z1", "scope": "Host",
                                                                      "type": "Filesystem", "host": host,
                                                                      "path": f"/pools/{host}"}))


async def settle(runtime: Runtime, rounds: int = 3) -> None:
    quiet = 0
    for _ in range(2000):
        await asyncio.sleep(0.005)
        busy = len(runtime.queue) or runtime.queue._active
        quiet = 0 if busy else quiet + 1
        if quiet >= rounds:
            return
    raise AssertionError("the runtime did not settle")


async def start(api: FakeApi) -> Runtime:
    runtime = Runtime(api, kinds.ALL, reconcilers.ALL, workers=2)
    api.runtime = runtime
    await runtime.start()
    await settle(runtime)
    return runtime


def agent_downloads(api: FakeApi) -> None:
    template = api.get("templates", "tiny", "demo")
    copy = template["status"]["zones"][0]
    assert template["metadata"]["labels"][HOST_LABEL] == copy["host"]
    template["status"]["download"] = {"zone": "z1", "host": copy["host"], "state": "Ready", "percent": 100,
                                      "detectedFormat": "QCOW2", "checksum": "sha256:" + "0" * 64,
                                      "virtualSizeBytes": GIB, "physicalSizeBytes": GIB // 64}
    api.put("templates", template)


def agent_creates_disk(api: FakeApi, name: str) -> dict:
    volume = api.get("volumes", name, "demo")
    volume["status"]["node"] = {"exists": True, "sizeBytes": volume["status"]["sizeBytes"]}
    api.put("volumes", volume)
    return volume


def agent_runs(api: FakeApi, name: str, state: str = "running") -> None:
    vm = api.get("virtualmachines", name, "demo")
    vm["status"]["node"] = {"host": vm["status"]["launch"]["host"] if vm["status"].get("launch") else None,
                            "domainState": state, "disks": [d["volume"] for d in
                                                           (vm["status"].get("launch") or {}).get("disks", [])]}
    api.put("virtualmachines", vm)


def conditions(raw):
    return {c["type"]: c for c in raw["status"].get("conditions", [])}


def test_a_vm_goes_from_template_to_running_and_back_to_stopped():
    async def scenario():
        api = FakeApi()
        world(api)
        runtime = await start(api)
        template = api.get("templates", "tiny", "demo")
        assert template["status"]["state"] == "Downloading" and template["status"]["zones"][0]["host"] == "h1"
        agent_downloads(api)
        await settle(runtime)
        template = api.get("templates", "tiny", "demo")
        assert template["status"]["state"] == "Ready" and HOST_LABEL not in template["metadata"].get("labels", {})

        before_vm = len(api.calls)
        api.put("virtualmachines", obj("VirtualMachine", "vm1", {"serviceOffering": "small",
                                                                 "template": {"name": "tiny"}, "zone": "z1"},
                                       namespace="demo"))
        await settle(runtime)
        vm = api.get("virtualmachines", "vm1", "demo")
        assert vm["status"]["placement"]["host"] == "h1" and vm["metadata"]["labels"][HOST_LABEL] == "h1"
        assert conditions(vm)["Scheduled"]["status"] == "True" and vm["status"]["phase"] == "Starting"
        root = api.get("volumes", "vm1-root", "demo")
        assert root["spec"]["storagePool"] == "h1-local" and root["spec"]["fromTemplate"]["name"] == "tiny"
        assert root["status"]["path"] == "/pools/h1/uid-vm1-root.qcow2"
        assert root["status"]["baseImage"]["source"].startswith("/images/templates/demo/tiny-")
        assert root["status"]["sizeBytes"] == GIB and root["metadata"]["labels"][HOST_LABEL] == "h1"
        # The placement and the launch go in one status write; the launch names the root disk's target before
        # the disk exists (the agent creates it before it starts the domain).
        launch = vm["status"]["launch"]
        assert launch["host"] == "h1" and launch["cpuNumber"] == 1 and launch["memoryMiB"] == 512
        assert launch["disks"][0]["path"] == root["status"]["path"] and launch["powerState"] == "Running"
        assert launch["disks"][0]["sizeBytes"] == GIB and launch["disks"][0]["pool"] == "h1-local"
        assert [c for c in api.calls if c == ("patch_status", "virtualmachines", "vm1")] == \
            [("patch_status", "virtualmachines", "vm1")]
        assert conditions(vm)["Ready"]["reason"] == "Starting" and conditions(vm)["StorageReady"]["status"] == "True"

        agent_creates_disk(api, "vm1-root")
        await settle(runtime)
        vm_after = api.get("virtualmachines", "vm1", "demo")
        assert vm_after["status"] == vm["status"], "the disk's creation rewrote the guest's status"
        agent_runs(api, "vm1")
        await settle(runtime)
        vm = api.get("virtualmachines", "vm1", "demo")
        assert vm["status"]["phase"] == "Running" and conditions(vm)["Ready"]["status"] == "True"
        # The root disk's status: its target (Creating), then Attached once the domain runs; no Ready between.
        root = api.get("volumes", "vm1-root", "demo")
        assert root["status"]["phase"] == "Attached" and conditions(root)["Ready"]["status"] == "True"
        assert api.calls.count(("patch_status", "volumes", "vm1-root")) == 2
        # One Event for the whole start: the guest's; its root disk's Ready and Attached raise none.
        assert [c[1] for c in api.calls[before_vm:] if c[0] == "event"] == ["Running"]
        host = api.get("hosts", "h1")
        assert host["status"]["capacity"]["cpuCores"]["allocated"] == 1
        assert runtime.reconcilers["virtualmachines"].ledger.used("h1") == (1, 512)

        vm["spec"]["state"] = "Stopped"
        api.put("virtualmachines", vm)
        await settle(runtime)
        vm = api.get("virtualmachines", "vm1", "demo")
        assert vm["status"]["phase"] == "Stopping" and vm["status"]["launch"]["powerState"] == "Stopped"
        agent_runs(api, "vm1", state="shutoff")
        await settle(runtime)
        vm = api.get("virtualmachines", "vm1", "demo")
        assert vm["status"]["phase"] == "Stopped" and "placement" not in vm["status"]
        assert runtime.reconcilers["virtualmachines"].ledger.used("h1") == (0, 0)
        await runtime.stop()

    asyncio.run(scenario())


def test_no_capacity_is_reported_and_retried_when_a_host_appears():
    async def scenario():
        api = FakeApi()
        world(api, cpus=1)
        runtime = await start(api)
        agent_downloads(api)
        await settle(runtime)
        for name in ("a", "b"):
            api.put("virtualmachines", obj("VirtualMachine", name, {"serviceOffering": "small",
                                                                    "template": {"name": "tiny"}, "zone": "z1"},
                                           namespace="demo"))
        await settle(runtime)
        placed = [api.get("virtualmachines", n, "demo")["status"].get("placement") for n in ("a", "b")]
        assert sum(1 for p in placed if p) == 1
        waiting = next(api.get("virtualmachines", n, "demo") for n in ("a", "b")
                       if not api.get("virtualmachines", n, "demo")["status"].get("placement"))
        scheduled = conditions(waiting)["Scheduled"]
        assert scheduled["reason"] == "InsufficientCapacity" and "h1 has 0 of 1 vCPUs free" in scheduled["message"]
        add_hosts(api, ("h2",), cpus=1)
        await settle(runtime)
        waiting = api.get("virtualmachines", waiting["metadata"]["name"], "demo")
        assert waiting["status"]["placement"]["host"] == "h2"
        await runtime.stop()

    asyncio.run(scenario())


def test_a_private_template_of_another_namespace_is_refused():
    async def scenario():
        api = FakeApi()
        world(api)
        runtime = await start(api)
        agent_downloads(api)
        api.put("virtualmachines", obj("VirtualMachine", "x", {"serviceOffering": "small", "zone": "z1",
                                                               "template": {"name": "tiny", "namespace": "demo"}},
                                       namespace="other"))
        await settle(runtime)
        vm = api.get("virtualmachines", "x", "other")
        assert conditions(vm)["Ready"]["reason"] == "TemplateNotVisible"
        assert vm["status"]["phase"] == "Stopped" and not vm["status"].get("placement")
        await runtime.stop()

    asyncio.run(scenario())


def test_deleting_a_running_vm_stops_it_deletes_its_root_disk_and_releases_capacity():
    async def scenario():
        api = FakeApi()
        world(api)
        runtime = await start(api)
        agent_downloads(api)
        api.put("virtualmachines", obj("VirtualMachine", "vm1", {"serviceOffering": "small",
                                                                 "template": {"name": "tiny"}, "zone": "z1"},
                                       namespace="demo"))
        await settle(runtime)
        agent_creates_disk(api, "vm1-root")
        await settle(runtime)
        agent_runs(api, "vm1")
        await settle(runtime)
        vm = api.get("virtualmachines", "vm1", "demo")
        assert FINALIZER in vm["metadata"]["finalizers"]
        await api.delete(kinds.VIRTUALMACHINES, "vm1", "demo")
        await settle(runtime)
        vm = api.get("virtualmachines", "vm1", "demo")
        assert vm["status"]["phase"] == "Expunging" and vm["status"]["launch"]["powerState"] == "Stopped"
        agent_runs(api, "vm1", state="shutoff")
        await settle(runtime)
        root = api.get("volumes", "vm1-root", "demo")
        assert root["metadata"].get("deletionTimestamp"), "root disk not being deleted"
        root["status"]["node"] = {"exists": False}
        api.put("volumes", root)
        await settle(runtime)
        assert api.get("volumes", "vm1-root", "demo") is None
        assert api.get("virtualmachines", "vm1", "demo") is None
        assert runtime.reconcilers["virtualmachines"].ledger.used("h1") == (0, 0)
        await runtime.stop()

    asyncio.run(scenario())



def test_a_data_volume_follows_its_guest_attach_resize_detach():
    async def scenario():
        api = FakeApi()
        world(api)
        api.put("diskofferings", obj("DiskOffering", "local-disk", {"diskSizeGiB": 2, "storageType": "local"}))
        runtime = await start(api)
        agent_downloads(api)
        api.put("volumes", obj("Volume", "data1", {"zone": "z1", "diskOffering": "local-disk"}, namespace="demo"))
        api.put("virtualmachines", obj("VirtualMachine", "vm1", {"serviceOffering": "small",
                                                                 "template": {"name": "tiny"}, "zone": "z1"},
                                       namespace="demo"))
        await settle(runtime)
        assert api.get("volumes", "data1", "demo")["status"]["phase"] == "Allocated"
        agent_creates_disk(api, "vm1-root")
        await settle(runtime)
        agent_runs(api, "vm1")
        await settle(runtime)

        volume = api.get("volumes", "data1", "demo")
        volume["spec"]["virtualMachine"] = {"name": "vm1"}
        api.put("volumes", volume)
        await settle(runtime)
        volume = api.get("volumes", "data1", "demo")
        assert volume["status"]["storagePool"] == "h1-local" and volume["status"]["sizeBytes"] == 2 * GIB
        assert volume["status"]["phase"] == "Creating" and "baseImage" not in volume["status"]
        agent_creates_disk(api, "data1")
        await settle(runtime)
        disks = api.get("virtualmachines", "vm1", "demo")["status"]["launch"]["disks"]
        assert [(d["volume"], d["device"]) for d in disks] == [("vm1-root", "vda"), ("data1", "vdb")]
        agent_runs(api, "vm1")
        await settle(runtime)
        assert api.get("volumes", "data1", "demo")["status"]["phase"] == "Attached"

        volume = api.get("volumes", "data1", "demo")
        volume["spec"]["sizeGiB"] = 3
        api.put("volumes", volume)
        await settle(runtime)
        volume = api.get("volumes", "data1", "demo")
        assert volume["status"]["sizeBytes"] == 3 * GIB and conditions(volume)["Ready"]["reason"] == "Resizing"

        del volume["spec"]["virtualMachine"]
        api.put("volumes", volume)
        await settle(runtime)
        disks = api.get("virtualmachines", "vm1", "demo")["status"]["launch"]["disks"]
        assert [d["volume"] for d in disks] == ["vm1-root"]
        await runtime.stop()

    asyncio.run(scenario())


def test_user_data_from_a_secret_is_a_reference_in_the_launch_and_a_missing_key_shows_as_start_failed():
    async def scenario():
        api = FakeApi()
        world(api)
        runtime = await start(api)
        agent_downloads(api)
        api.put("virtualmachines", obj("VirtualMachine", "vm1", {
            "serviceOffering": "small", "template": {"name": "tiny"}, "zone": "z1",
            "userDataSecretRef": {"name": "vm1-userdata"}}, namespace="demo"))
        await settle(runtime)
        agent_creates_disk(api, "vm1-root")
        await settle(runtime)
        launch = api.get("virtualmachines", "vm1", "demo")["status"]["launch"]
        # The agent reads the Secret itself: the launch names it and holds nothing of its content.
        assert launch["userDataSecret"] == {"namespace": "demo", "name": "vm1-userdata", "key": "userdata"}
        assert "userData" not in launch

        vm = api.get("virtualmachines", "vm1", "demo")
        message = "user data Secret demo/vm1-userdata has no key 'userdata'"
        vm["status"]["node"] = {"host": "h1", "domainState": "shutoff", "message": message}
        api.put("virtualmachines", vm)
        await settle(runtime)
        vm = api.get("virtualmachines", "vm1", "demo")
        assert vm["status"]["phase"] == "Starting"
        assert any(c["reason"] == "StartFailed" and c["message"] == message for c in conditions(vm).values())
        await runtime.stop()

    asyncio.run(scenario())


def test_the_planner_inventory_recomputes_only_the_candidates_of_changed_hosts_and_pools():
    async def scenario():
        api = FakeApi()
        world(api, hosts=("h1", "h2", "h3"))
        runtime = await start(api)
        vms = runtime.reconcilers["virtualmachines"]
        hosts, pools = vms._candidates("z1")
        inventory = vms._inventory("z1")
        assert [h.name for h in hosts] == ["h1", "h2", "h3"] and len(pools) == 3

        # A capacity change on h2's Host (as a placement makes) is a new stored object: only its candidate is
        # computed again, and since it holds nothing that changed, the inventory stays the same.
        host = api.get("hosts", "h2")
        host["status"]["capacity"]["cpuCores"]["allocated"] = 1
        api.put("hosts", host)
        again, pools_again = vms._candidates("z1")
        assert all(a is b for a, b in zip(again, hosts))
        assert all(a is b for a, b in zip(pools_again, pools))
        assert vms._inventory("z1") is inventory

        # A pool's allocation is in its candidate: that one changes, and the inventory is rebuilt with it.
        pool = api.get("storagepools", "h3-local")
        pool["status"]["allocatedBytes"] = 5 * GIB
        api.put("storagepools", pool)
        _, pools_after = vms._candidates("z1")
        changed = [p.name for p, q in zip(pools_after, pools) if p is not q]
        assert changed == ["h3-local"] and pools_after[2].allocated_bytes == 5 * GIB
        rebuilt = vms._inventory("z1")
        assert rebuilt is not inventory and any(p.allocated_bytes == 5 * GIB for p in rebuilt.pools_by_host["h3"])
        await runtime.stop()

    asyncio.run(scenario())


def test_a_placement_lost_in_a_controller_crash_keeps_its_host_for_its_guest():
    """The controller stopped after ``prepare`` created a guest's root Volume on the planner's local pool and before
    the placement was recorded: after the restart, a guest reconciled first does not take the one place left."""
    async def scenario():
        api = FakeApi()
        world(api, cpus=1)
        runtime = await start(api)
        agent_downloads(api)
        await settle(runtime)
        await runtime.stop()
        api.runtime = None
        spec = {"serviceOffering": "small", "template": {"name": "tiny"}, "zone": "z1"}
        api.put("virtualmachines", obj("VirtualMachine", "a", spec, namespace="demo"))  # queued first on restart
        api.put("virtualmachines", obj("VirtualMachine", "z", spec, namespace="demo", finalizers=[FINALIZER]))
        api.put("volumes", obj("Volume", "z-root", {
            "type": "ROOT", "zone": "z1", "virtualMachine": {"name": "z"}, "storagePool": "h1-local",
            "fromTemplate": {"name": "tiny", "namespace": "demo"}}, namespace="demo", finalizers=[FINALIZER],
            labels={HOST_LABEL: "h1"}))
        runtime = await start(api)
        await settle(runtime)
        z, a = api.get("virtualmachines", "z", "demo"), api.get("virtualmachines", "a", "demo")
        assert (z["status"].get("placement") or {}).get("host") == "h1", conditions(z).get("Scheduled")
        assert not a["status"].get("placement")
        assert conditions(a)["Scheduled"]["reason"] == "InsufficientCapacity"
        assert runtime.reconcilers["virtualmachines"].ledger.used("h1") == (1, 512)
        await runtime.stop()

    asyncio.run(scenario())
