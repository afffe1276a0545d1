"""Live migration and host maintenance through the whole stack on simulated hosts (one agent process simulates
the hosts, so the simulator moves domains between them): a guest on local storage moves with its volume and keeps
its address, a failing hypervisor leaves it on its source with the target released, and maintenance evacuates a
host, reports the guest that cannot move, reaches Maintenance and is cancelled back to Enabled."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

pytest.register_assert_rewrite("conftest_libvirt")
from conftest_libvirt import Cloud, unique, wait_for  # noqa: E402
from simzone import Tenant, create_sim_zone, ready_template, wait_hosts_up  # noqa: E402

from controllers.api.v1alpha1.host import SIMULATOR_FAULTS_ANNOTATION  # noqa: E402

pytest_plugins = ["conftest_libvirt"]
pytestmark = [pytest.mark.usefixtures("controller", "system_namespace"), pytest.mark.timeout(240)]


@pytest.fixture
def sim_zone(cloud: Cloud, kube, control_plane, agents):
    """A zone of three simulated hosts (4 vCPUs each) with a local pool each, and a Ready template."""
    base = unique("mig")
    hosts = [f"{base}-{index}" for index in range(3)]
    zone, cluster = create_sim_zone(cloud, hosts, "10.248.0")
    small = unique("small")
    cloud.create("serviceofferings", small, {"cpuNumber": 1, "memoryMiB": 256, "storageType": "local"})
    namespace = unique("tenant")
    control_plane.kubectl("create", "namespace", namespace)
    agent = agents.start(base, "--host", base, "--simulate", "3", "--hypervisor", "simulator", "--register-cluster",
                         cluster, "--sim-cpus", "4", "--sim-memory-mib", "8192", "--heartbeat-interval", "1",
                         "--lease-duration", "10", "--vm-resync", "2")
    wait_hosts_up(cloud, hosts)
    tenant = Tenant(kube, namespace)
    ready_template(tenant, zone)
    return {"zone": zone, "small": small, "tenant": tenant, "hosts": hosts, "cloud": cloud, "agent": agent}


def guest(world: dict, name: str, **spec: Any) -> dict[str, Any]:
    tenant = world["tenant"]
    tenant.create("virtualmachines", "VirtualMachine", name, {
        "serviceOffering": world["small"], "template": {"name": "img"}, "zone": world["zone"], **spec})
    return wait_for(lambda: tenant.status("virtualmachines", name).get("phase") == "Running"
                    and tenant.status("virtualmachines", name), timeout=60, what=f"{name} Running")


def migrate(world: dict, name: str, vm: str, host: str | None = None) -> None:
    spec: dict[str, Any] = {"virtualMachine": {"name": vm}}
    if host:
        spec["host"] = host
    world["tenant"].create("virtualmachinemigrations", "VirtualMachineMigration", name, spec)


def finished(world: dict, name: str) -> dict[str, Any]:
    tenant = world["tenant"]
    return wait_for(lambda: tenant.status("virtualmachinemigrations", name).get("phase") in ("Succeeded", "Failed")
                    and tenant.status("virtualmachinemigrations", name), timeout=60, what=f"migration {name} ends")


def faults_seen(world: dict, host: str, faults: list[str]) -> None:
    """Wait until the agent has applied the host's fault annotation (it logs each change)."""
    wait_for(lambda: any(r.get("msg") == "simulator faults configured" and r.get("host") == host
                         and r.get("faults") == faults for r in world["agent"].log_records()),
             what=f"faults {faults} on {host}")


def host_vms(world: dict, host: str) -> int | None:
    return (world["cloud"].get("hosts", host).get("status") or {}).get("virtualMachines")


def test_live_migration_moves_the_guest_and_its_local_volume(sim_zone):
    tenant, hosts = sim_zone["tenant"], sim_zone["hosts"]
    before = guest(sim_zone, "web", nics=[])
    source = before["placement"]["host"]
    target = next(h for h in hosts if h != source)
    root_before = tenant.status("volumes", "web-root")
    assert root_before["host"] == source

    started = time.monotonic()
    migrate(sim_zone, "move-web", "web", target)
    done = finished(sim_zone, "move-web")
    assert done["phase"] == "Succeeded", done
    assert (done["sourceHost"], done["targetHost"]) == (source, target)
    assert [d["targetPool"] for d in done["plan"]["disks"]] == [f"{target}-local"]

    after = wait_for(lambda: (s := tenant.status("virtualmachines", "web")).get("phase") == "Running"
                     and s["placement"]["host"] == target and (s.get("node") or {}).get("host") == target and s,
                     timeout=30, what="web Running on the target")
    elapsed = time.monotonic() - started
    assert "migration" not in after
    assert after["launch"]["host"] == target
    assert after["node"]["domainUuid"] == before["node"]["domainUuid"]
    root = wait_for(lambda: (v := tenant.status("volumes", "web-root")).get("host") == target and v,
                    what="root volume on the target")
    assert root["storagePool"] == f"{target}-local" and root["path"].startswith(f"/sim/{target}/")
    assert after["launch"]["disks"][0]["path"] == root["path"]
    # The source copy goes once the volume names its new place; then no agent acts on the record any more.
    wait_for(lambda: tenant.status("virtualmachinemigrations", "move-web").get("cleanedUp") is True,
             what="source copy removed")
    wait_for(lambda: "cumulo.io/host" not in tenant.get("virtualmachinemigrations", "move-web")["metadata"].get(
        "labels", {}), what="record unbound")
    wait_for(lambda: host_vms(sim_zone, target) == 1 and host_vms(sim_zone, source) == 0,
             what="capacity moved to the target")
    print(f"simulated migration round trip {elapsed:.1f}s")


def test_a_failed_migration_leaves_the_guest_on_its_source_and_releases_the_target(sim_zone):
    tenant, hosts, cloud = sim_zone["tenant"], sim_zone["hosts"], sim_zone["cloud"]
    before = guest(sim_zone, "db")
    source = before["placement"]["host"]
    target = next(h for h in hosts if h != source)
    cloud.patch("hosts", source, {"metadata": {"annotations": {SIMULATOR_FAULTS_ANNOTATION: json.dumps(
        {"migrate": {"fail": True, "message": "injected: migration stream broken"}})}}})
    faults_seen(sim_zone, source, ["migrate"])
    migrate(sim_zone, "move-db", "db", target)
    failed = finished(sim_zone, "move-db")
    assert failed["phase"] == "Failed" and failed["reason"] == "MigrationFailed", failed
    assert "migration stream broken" in failed["message"]
    status = wait_for(lambda: (s := tenant.status("virtualmachines", "db")).get("phase") == "Running" and s,
                      what="db Running again")
    assert status["placement"]["host"] == source and status["node"]["host"] == source
    assert "migration" not in status
    # The target disk prepared for the copy is removed, and the migration says so.
    wait_for(lambda: tenant.status("virtualmachinemigrations", "move-db").get("cleanedUp") is True,
             what="target cleaned up")
    assert tenant.get("virtualmachinemigrations", "move-db")["metadata"].get("labels", {}).get("cumulo.io/host") is None

    # The reservation on the target is gone: a second attempt (fault cleared) takes it and succeeds.
    cloud.patch("hosts", source, {"metadata": {"annotations": {SIMULATOR_FAULTS_ANNOTATION: None}}})
    faults_seen(sim_zone, source, [])
    migrate(sim_zone, "move-db-again", "db", target)
    assert finished(sim_zone, "move-db-again")["phase"] == "Succeeded"
    # A guest that is not running cannot be migrated; the answer says why.
    tenant.patch("virtualmachines", "db", {"state": "Stopped"})
    wait_for(lambda: tenant.status("virtualmachines", "db").get("phase") == "Stopped", what="db Stopped")
    migrate(sim_zone, "move-stopped", "db")
    refused = finished(sim_zone, "move-stopped")
    assert refused["phase"] == "Failed" and refused["reason"] == "VirtualMachineNotRunning", refused


def test_maintenance_evacuates_reports_the_unmovable_guest_and_cancels(sim_zone):
    tenant, hosts, cloud = sim_zone["tenant"], sim_zone["hosts"], sim_zone["cloud"]
    first = hosts[0]
    # FirstFit puts the guests on the first host; the third is pinned there, so it cannot move.
    for name in ("a", "b"):
        assert guest(sim_zone, name)["placement"]["host"] == first
    assert guest(sim_zone, "pinned", placement={"host": first})["placement"]["host"] == first

    cloud.patch("hosts", first, {"spec": {"maintenance": True}})
    wait_for(lambda: all(tenant.status("virtualmachines", n).get("placement", {}).get("host") not in (None, first)
                         and tenant.status("virtualmachines", n).get("phase") == "Running" for n in ("a", "b")),
             timeout=90, what="a and b evacuated")
    host = wait_for(lambda: (s := cloud.get("hosts", first)["status"]).get("resourceState") == "ErrorInMaintenance"
                    and s, timeout=60, what="ErrorInMaintenance")
    condition = next(c for c in host["conditions"] if c["type"] == "Maintenance")
    assert condition["reason"] == "CannotEvacuate" and f"{tenant.namespace}/pinned" in condition["message"], condition
    assert "pinned" in condition["message"]
    assert tenant.status("virtualmachines", "pinned")["placement"]["host"] == first  # still running where it was
    assert tenant.status("virtualmachines", "pinned")["phase"] == "Running"

    # A stopped guest loses its placement: nothing is left, the host reaches Maintenance.
    tenant.patch("virtualmachines", "pinned", {"state": "Stopped"})
    wait_for(lambda: cloud.get("hosts", first)["status"].get("resourceState") == "Maintenance", timeout=60,
             what="Maintenance")
    assert host_vms(sim_zone, first) == 0
    # No new placement while in maintenance: a guest pinned there waits.
    tenant.create("virtualmachines", "VirtualMachine", "late", {
        "serviceOffering": sim_zone["small"], "template": {"name": "img"}, "zone": sim_zone["zone"],
        "placement": {"host": first}})
    wait_for(lambda: next((c for c in tenant.status("virtualmachines", "late").get("conditions", [])
                           if c["type"] == "Scheduled"), {}).get("status") == "False", what="late refused")

    cloud.patch("hosts", first, {"spec": {"maintenance": False}})
    wait_for(lambda: cloud.get("hosts", first)["status"].get("resourceState") == "Enabled", timeout=30,
             what="Enabled again")
    wait_for(lambda: not [m for m in tenant.list("virtualmachinemigrations")
                          if m["metadata"].get("labels", {}).get("cumulo.io/evacuating") == first],
             what="evacuation records removed")
    guest_late = wait_for(lambda: tenant.status("virtualmachines", "late").get("phase") == "Running"
                          and tenant.status("virtualmachines", "late"), timeout=60, what="late Running after cancel")
    assert guest_late["placement"]["host"] == first
