"""Placement through the whole stack on simulated hosts: affinity groups, a guest too big for any host
waiting for capacity, destroy/recover/expunge, and bad references answered with conditions."""

from __future__ import annotations

import time
from typing import Any

import pytest
from kubernetes import client

pytest.register_assert_rewrite("conftest_libvirt")
from conftest_libvirt import Cloud, unique, wait_for  # noqa: E402
from simzone import Tenant, create_sim_zone, ready_template, wait_hosts_up  # noqa: E402

pytest_plugins = ["conftest_libvirt"]
pytestmark = [pytest.mark.usefixtures("controller", "system_namespace"), pytest.mark.timeout(240)]


@pytest.fixture
def sim_zone(cloud: Cloud, kube, control_plane, agents):
    """A zone of three simulated hosts (4 vCPUs each) with local pools, an image store and a Ready template."""
    base = unique("place")
    zone, cluster = create_sim_zone(cloud, [f"{base}-{index}" for index in range(4)], "10.249.0")
    small, big = unique("small"), unique("big")
    cloud.create("serviceofferings", small, {"cpuNumber": 1, "memoryMiB": 256, "storageType": "local"})
    cloud.create("serviceofferings", big, {"cpuNumber": 8, "memoryMiB": 256, "storageType": "local"})
    namespace = unique("tenant")
    control_plane.kubectl("create", "namespace", namespace)
    args = ["--hypervisor", "simulator", "--register-cluster", cluster, "--sim-cpus", "4", "--sim-memory-mib", "8192",
            "--heartbeat-interval", "1", "--lease-duration", "10", "--vm-resync", "2"]
    agents.start(base, "--host", base, "--simulate", "3", *args)
    hosts = [f"{base}-{index}" for index in range(3)]
    wait_hosts_up(cloud, hosts)
    tenant = Tenant(kube, namespace)
    ready_template(tenant, zone)

    def start_fourth_host() -> str:
        agents.start(f"{base}-extra", "--host", f"{base}-3", *args, "--sim-cpus", "8")
        return f"{base}-3"

    return {"zone": zone, "small": small, "big": big, "tenant": tenant, "hosts": hosts,
            "add_big_host": start_fourth_host}


def vm(world: dict, name: str, offering: str | None = None, **spec: Any) -> None:
    world["tenant"].create("virtualmachines", "VirtualMachine", name, {
        "serviceOffering": offering or world["small"], "template": {"name": "img"}, "zone": world["zone"], **spec})


def host_of(world: dict, name: str) -> str | None:
    return (world["tenant"].status("virtualmachines", name).get("placement") or {}).get("host")


def running(world: dict, name: str) -> bool:
    return world["tenant"].status("virtualmachines", name).get("phase") == "Running"


def test_anti_affinity_spreads_and_affinity_packs(sim_zone):
    tenant = sim_zone["tenant"]
    tenant.create("affinitygroups", "AffinityGroup", "apart", {"type": "HostAntiAffinity"})
    tenant.create("affinitygroups", "AffinityGroup", "together", {"type": "HostAffinity"})
    vm(sim_zone, "a1", affinityGroups=["apart"])
    wait_for(lambda: running(sim_zone, "a1"), what="a1 Running")
    vm(sim_zone, "a2", affinityGroups=["apart"])
    wait_for(lambda: running(sim_zone, "a2"), what="a2 Running")
    assert host_of(sim_zone, "a1") != host_of(sim_zone, "a2")
    vm(sim_zone, "t1", affinityGroups=["together"])
    wait_for(lambda: running(sim_zone, "t1"), what="t1 Running")
    vm(sim_zone, "t2", affinityGroups=["together"])
    wait_for(lambda: running(sim_zone, "t2"), what="t2 Running")
    assert host_of(sim_zone, "t1") == host_of(sim_zone, "t2")


def test_a_guest_bigger_than_any_host_waits_with_the_reason_and_starts_on_a_new_host(sim_zone):
    tenant = sim_zone["tenant"]
    vm(sim_zone, "huge", offering=sim_zone["big"])
    refused = wait_for(lambda: tenant.condition("huge", "Scheduled").get("reason") == "InsufficientCapacity"
                       and tenant.condition("huge", "Scheduled"), what="InsufficientCapacity")
    assert "of 8 vCPUs free" in refused["message"]
    version = tenant.get("virtualmachines", "huge")["metadata"]["resourceVersion"]
    time.sleep(2)
    assert tenant.get("virtualmachines", "huge")["metadata"]["resourceVersion"] == version, "retried in a loop"
    new_host = sim_zone["add_big_host"]()
    wait_for(lambda: running(sim_zone, "huge"), timeout=60, what="the big guest Running")
    assert host_of(sim_zone, "huge") == new_host


def test_destroy_recover_destroy_expunge(sim_zone, cloud):
    tenant = sim_zone["tenant"]
    vm(sim_zone, "d1", expungeDelaySeconds=3600)
    wait_for(lambda: running(sim_zone, "d1"), what="d1 Running")
    host = host_of(sim_zone, "d1")
    allocated = lambda: cloud.get("hosts", host)["status"]["capacity"]["cpuCores"]["allocated"]  # noqa: E731
    wait_for(lambda: allocated() >= 1, what="d1's capacity in its host's rollup (written within --rollup-delay)")
    before = allocated()
    tenant.patch("virtualmachines", "d1", {"state": "Destroyed"})
    wait_for(lambda: tenant.status("virtualmachines", "d1").get("phase") == "Destroyed", what="Destroyed")
    wait_for(lambda: allocated() == before - 1, what="capacity released")
    assert tenant.get("volumes", "d1-root") is not None, "the root disk went before the expunge delay"
    tenant.patch("virtualmachines", "d1", {"state": "Running"})  # recover
    wait_for(lambda: running(sim_zone, "d1"), what="recovered")
    assert host_of(sim_zone, "d1") == host, "a local root disk keeps the guest on its host"
    tenant.patch("virtualmachines", "d1", {"state": "Destroyed", "expungeDelaySeconds": 1})
    wait_for(lambda: tenant.get("virtualmachines", "d1") is None, timeout=30, what="expunged")
    wait_for(lambda: tenant.get("volumes", "d1-root") is None, what="the root volume gone")
    assert allocated() == before - 1


def test_bad_references_are_conditions(sim_zone, kube, control_plane):
    """The controller's own line behind the admission webhook (test_admission.py): the tenant's namespace
    is opted out of the webhook so the bad references reach the controller."""
    tenant = sim_zone["tenant"]
    control_plane.kubectl("label", "namespace", tenant.namespace, "cumulo.io/admission-webhook=disabled")
    vm(sim_zone, "no-offering", offering="does-not-exist")
    tenant.create("virtualmachines", "VirtualMachine", "no-template", {
        "serviceOffering": sim_zone["small"], "template": {"name": "nope"}, "zone": sim_zone["zone"]})
    other = Tenant(kube, unique("other"))
    client.CoreV1Api(kube).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
        name=other.namespace, labels={"cumulo.io/admission-webhook": "disabled"})))
    other.create("virtualmachines", "VirtualMachine", "borrower", {
        "serviceOffering": sim_zone["small"], "template": {"name": "img", "namespace": tenant.namespace},
        "zone": sim_zone["zone"]})
    for who, name, reason in ((tenant, "no-offering", "ServiceOfferingNotFound"),
                              (tenant, "no-template", "TemplateNotFound"),
                              (other, "borrower", "TemplateNotVisible")):
        ready = wait_for(lambda w=who, n=name, r=reason: w.condition(n, "Ready").get("reason") == r
                         and w.condition(n, "Ready"), what=reason)
        assert ready["status"] == "False" and ready["message"]
        assert not who.status("virtualmachines", name).get("placement")
