"""The controller's side of a live migration on the fake API, with the agents' reports written by hand: the target
reserved in the guest's status before any agent hears of it (and held by the ledger a restarted controller
rebuilds), the hand-over mark before the source migrates, volumes then placement moved on success, the target
released on failure."""

from __future__ import annotations

import asyncio

from fakeapi import FakeApi
from test_vm_reconciler import agent_creates_disk, agent_downloads, agent_runs, obj, settle, start, world

from controllers.api.v1alpha1.host import HOST_LABEL


def running_guest(api: FakeApi):
    async def go():
        runtime = await start(api)
        agent_downloads(api)
        await settle(runtime)
        api.put("virtualmachines", obj("VirtualMachine", "vm1", {"serviceOffering": "small",
                                                                 "template": {"name": "tiny"}, "zone": "z1"},
                                       namespace="demo"))
        await settle(runtime)
        agent_creates_disk(api, "vm1-root")
        await settle(runtime)
        agent_runs(api, "vm1")
        await settle(runtime)
        return runtime
    return go()


def report(api: FakeApi, name: str, **node) -> None:
    migration = api.get("virtualmachinemigrations", name, "demo")
    migration["status"]["node"] = {"done": True, **node}
    api.put("virtualmachinemigrations", migration)


def test_a_migration_reserves_the_target_durably_moves_volume_and_placement_and_releases_the_source():
    async def scenario():
        api = FakeApi()
        world(api, hosts=("h1", "h2"))
        runtime = await running_guest(api)
        assert api.get("virtualmachines", "vm1", "demo")["status"]["placement"]["host"] == "h1"
        api.put("virtualmachinemigrations", obj("VirtualMachineMigration", "m1", {"virtualMachine": {"name": "vm1"}},
                                                namespace="demo"))
        await settle(runtime)
        migration = api.get("virtualmachinemigrations", "m1", "demo")
        assert migration["status"]["phase"] == "PreparingTarget", migration["status"]
        assert migration["metadata"]["labels"][HOST_LABEL] == "h2"
        plan = migration["status"]["plan"]
        assert (plan["sourceHost"], plan["targetHost"]) == ("h1", "h2")
        assert [(d["targetPool"], d["targetPath"]) for d in plan["disks"]] == [("h2-local",
                                                                                 "/pools/h2/uid-vm1-root.qcow2")]
        vm = api.get("virtualmachines", "vm1", "demo")
        assert vm["status"]["migration"] == {"name": "m1", "sourceHost": "h1", "targetHost": "h2",
                                             "targetPool": "h2-local", "migrating": False}
        assert vm["status"]["phase"] == "Migrating"
        assert runtime.reconcilers["virtualmachines"].ledger.used("h2") == (1, 512)

        # A controller restart rebuilds the ledger from the objects: the target stays reserved.
        await runtime.stop()
        runtime = await start(api)
        ledger = runtime.reconcilers["virtualmachines"].ledger
        assert ledger.used("h1") == (1, 512) and ledger.used("h2") == (1, 512)

        report(api, "m1", host="h2", step="PreparingTarget", succeeded=True)
        await settle(runtime)
        migration = api.get("virtualmachinemigrations", "m1", "demo")
        assert migration["status"]["phase"] == "Migrating" and migration["metadata"]["labels"][HOST_LABEL] == "h1"
        assert api.get("virtualmachines", "vm1", "demo")["status"]["migration"]["migrating"] is True

        report(api, "m1", host="h1", step="Migrating", succeeded=True, seconds=2.5)
        await settle(runtime)
        migration = api.get("virtualmachinemigrations", "m1", "demo")
        assert migration["status"]["phase"] == "Succeeded" and "in 2.5s" in migration["status"]["message"]
        assert migration["metadata"]["labels"][HOST_LABEL] == "h1"  # the source copy goes next
        vm = api.get("virtualmachines", "vm1", "demo")
        assert "migration" not in vm["status"]
        assert vm["status"]["placement"]["host"] == "h2" and vm["status"]["placement"]["storagePool"] == "h2-local"
        assert vm["status"]["launch"]["host"] == "h2"
        assert vm["status"]["launch"]["disks"][0]["path"] == "/pools/h2/uid-vm1-root.qcow2"
        assert vm["metadata"]["labels"][HOST_LABEL] == "h2"
        root = api.get("volumes", "vm1-root", "demo")
        assert (root["status"]["storagePool"], root["status"]["host"]) == ("h2-local", "h2")
        assert ledger.used("h1") == (0, 0) and ledger.used("h2") == (1, 512)

        report(api, "m1", host="h1", step="CleaningSource", succeeded=True)
        await settle(runtime)
        migration = api.get("virtualmachinemigrations", "m1", "demo")
        assert migration["status"]["cleanedUp"] is True and HOST_LABEL not in migration["metadata"].get("labels", {})
        await runtime.stop()

    asyncio.run(scenario())


def test_a_failed_migration_leaves_the_guest_and_releases_the_target():
    async def scenario():
        api = FakeApi()
        world(api, hosts=("h1", "h2"))
        runtime = await running_guest(api)
        api.put("virtualmachinemigrations", obj("VirtualMachineMigration", "m1", {"virtualMachine": {"name": "vm1"},
                                                                                 "host": "h2"}, namespace="demo"))
        await settle(runtime)
        report(api, "m1", host="h2", step="PreparingTarget", succeeded=True)
        await settle(runtime)
        report(api, "m1", host="h1", step="Migrating", succeeded=False, message="libvirt: connection refused")
        await settle(runtime)
        migration = api.get("virtualmachinemigrations", "m1", "demo")
        assert migration["status"]["phase"] == "Failed" and migration["status"]["reason"] == "MigrationFailed"
        assert migration["status"]["message"] == "libvirt: connection refused"
        assert migration["metadata"]["labels"][HOST_LABEL] == "h2"  # the target's disk copy goes
        vm = api.get("virtualmachines", "vm1", "demo")
        assert "migration" not in vm["status"] and vm["status"]["placement"]["host"] == "h1"
        assert vm["status"]["phase"] == "Running"
        ledger = runtime.reconcilers["virtualmachines"].ledger
        assert ledger.used("h1") == (1, 512) and ledger.used("h2") == (0, 0)

        # A second migration of a guest that is not running, and one to its own host, are refused with reasons.
        api.put("virtualmachinemigrations", obj("VirtualMachineMigration", "same", {
            "virtualMachine": {"name": "vm1"}, "host": "h1"}, namespace="demo"))
        api.put("virtualmachinemigrations", obj("VirtualMachineMigration", "ghost", {
            "virtualMachine": {"name": "nope"}}, namespace="demo"))
        await settle(runtime)
        assert api.get("virtualmachinemigrations", "same", "demo")["status"]["reason"] == "SameHost"
        assert api.get("virtualmachinemigrations", "ghost", "demo")["status"]["reason"] == "VirtualMachineNotFound"
        await runtime.stop()

    asyncio.run(scenario())


def test_after_a_source_agent_restart_the_target_says_where_the_domain_runs():
    async def scenario(landed: bool):
        api = FakeApi()
        world(api, hosts=("h1", "h2"))
        runtime = await running_guest(api)
        api.put("virtualmachinemigrations", obj("VirtualMachineMigration", "m1", {
            "virtualMachine": {"name": "vm1"}, "host": "h2"}, namespace="demo"))
        await settle(runtime)
        report(api, "m1", host="h2", step="PreparingTarget", succeeded=True)
        await settle(runtime)
        # The restarted source agent finds the domain gone: the target's agent is asked next.
        report(api, "m1", host="h1", step="Migrating", verify=True, message="the domain left this host")
        await settle(runtime)
        migration = api.get("virtualmachinemigrations", "m1", "demo")
        assert migration["status"]["phase"] == "Migrating" and migration["status"]["verifying"] is True
        assert migration["metadata"]["labels"][HOST_LABEL] == "h2"
        assert api.get("virtualmachines", "vm1", "demo")["status"]["migration"]["migrating"] is True
        report(api, "m1", host="h2", step="Verifying", succeeded=landed,
               message="" if landed else "the domain does not run on the target")
        await settle(runtime)
        migration = api.get("virtualmachinemigrations", "m1", "demo")
        vm = api.get("virtualmachines", "vm1", "demo")
        if landed:
            assert migration["status"]["phase"] == "Succeeded" and vm["status"]["placement"]["host"] == "h2"
        else:
            assert migration["status"]["phase"] == "Failed" and migration["status"]["reason"] == "DomainLost"
            assert "migration" not in vm["status"] and vm["status"]["placement"]["host"] == "h1"
        await runtime.stop()

    asyncio.run(scenario(landed=True))
    asyncio.run(scenario(landed=False))
