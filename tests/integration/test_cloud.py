"""Controller and real host agents together: hosts come Up with real capacity, roll-ups, agent loss.

One agent drives a private libvirtd (real QEMU facts), the other the simulator; the controller turns
their heartbeats and reports into host state, conditions and capacity at every level.
"""

from __future__ import annotations

import json
import time

import pytest

pytest.register_assert_rewrite("conftest_libvirt")
from conftest_libvirt import Cloud, unique, wait_for  # noqa: E402

from controllers.api.v1alpha1.host import SIMULATOR_FAULTS_ANNOTATION  # noqa: E402

pytest_plugins = ["conftest_libvirt"]
pytestmark = pytest.mark.usefixtures("controller", "system_namespace")


def status(cloud: Cloud, plural: str, name: str) -> dict:
    return cloud.get(plural, name).get("status") or {}


def condition(cloud: Cloud, plural: str, name: str, type_: str) -> dict:
    return next((c for c in status(cloud, plural, name).get("conditions", []) if c["type"] == type_), {})


def build_zone(cloud: Cloud) -> tuple[str, str]:
    zone, pod = unique("zone"), unique("pod")
    cloud.create("zones", zone, {"networkType": "Advanced", "dns1": "192.0.2.53"})
    cloud.create("hostpods", pod, {"zone": zone, "cidr": "10.251.0.0/24", "gateway": "10.251.0.1",
                                   "startIp": "10.251.0.10", "endIp": "10.251.0.20"})
    return zone, pod


def create_cluster(cloud: Cloud, name: str, pod: str, hypervisor: str, cpu_ratio: float = 1.0) -> None:
    cloud.create("clusters", name, {"pod": pod, "hypervisorType": hypervisor, "cpuOvercommitRatio": cpu_ratio})


def test_libvirt_and_simulator_hosts_go_up_with_real_capacity_rolled_up(cloud, agents, libvirtd, tmp_path):
    zone, pod = build_zone(cloud)
    kvm_cluster, sim_cluster = unique("kvm"), unique("sim")
    create_cluster(cloud, kvm_cluster, pod, "KVM", cpu_ratio=2.0)
    create_cluster(cloud, sim_cluster, pod, "Simulator")
    kvm_host, sim_host = unique("kvmhost"), unique("simhost")
    cloud.create("hosts", kvm_host, {"cluster": kvm_cluster})
    cloud.create("hosts", sim_host, {"cluster": sim_cluster})
    pool = unique("local")
    cloud.create("storagepools", pool, {"zone": zone, "scope": "Host", "type": "Filesystem", "host": kvm_host,
                                        "path": str(tmp_path / "pool")})
    agents.start(kvm_host, "--host", kvm_host, "--hypervisor", "libvirt", "--libvirt-uri", libvirtd.uri,
                 "--network-driver", "simulator", "--heartbeat-interval", "1", "--lease-duration", "3")
    agents.start(sim_host, "--host", sim_host, "--hypervisor", "simulator", "--sim-cpus", "16",
                 "--sim-memory-mib", "65536", "--heartbeat-interval", "1", "--lease-duration", "3")

    for host in (kvm_host, sim_host):
        wait_for(lambda h=host: status(cloud, "hosts", h).get("state") == "Up", what=f"{host} Up", timeout=30)
        assert condition(cloud, "hosts", host, "Ready")["status"] == "True"
    kvm = status(cloud, "hosts", kvm_host)
    assert kvm["node"]["hypervisorType"] == "KVM" and kvm["node"]["virtType"] == "qemu"
    cores, memory = kvm["node"]["cpuCores"], kvm["node"]["memoryMiB"]
    assert cores > 0 and memory > 0
    assert kvm["capacity"]["cpuCores"]["total"] == cores * 2  # the cluster's CPU overcommit
    assert kvm["capacity"]["memoryMiB"]["total"] == memory
    wait_for(lambda: status(cloud, "storagepools", pool).get("state") == "Up", what="the local pool Up")
    pool_status = status(cloud, "storagepools", pool)
    assert pool_status["capacityBytes"] > 0 and pool_status["hostAccess"][kvm_host]["reachable"]

    expected_cpu = cores * 2 + 16
    wait_for(lambda: ((status(cloud, "zones", zone).get("capacity") or {}).get("cpuCores") or {})
             .get("total") == expected_cpu, what="zone CPU roll-up", timeout=20)
    # Rollups chain (pool -> cluster -> pod), each written within --rollup-delay of the change below it.
    wait_for(lambda: status(cloud, "hostpods", pod)["capacity"]["primaryStorageGiB"]["total"] ==
             pool_status["capacityBytes"] // 2**30, what="pod storage roll-up", timeout=20)
    pod_capacity = status(cloud, "hostpods", pod)["capacity"]
    assert pod_capacity["cpuCores"]["total"] == expected_cpu
    assert pod_capacity["memoryMiB"]["total"] == memory + 65536
    assert pod_capacity["primaryStorageGiB"]["total"] == pool_status["capacityBytes"] // 2**30
    assert status(cloud, "zones", zone)["hosts"] == 2


def test_a_lost_agent_disconnects_its_host_and_a_restart_brings_it_back(cloud, agents):
    zone, pod = build_zone(cloud)
    cluster, host = unique("sim"), unique("simhost")
    create_cluster(cloud, cluster, pod, "Simulator")
    args = ("--host", host, "--hypervisor", "simulator", "--register-cluster", cluster, "--heartbeat-interval", "1",
            "--lease-duration", "3")
    agent = agents.start(host, *args)
    wait_for(lambda: status(cloud, "hosts", host).get("state") == "Up", what="Up", timeout=30)
    uid = cloud.get("hosts", host)["metadata"]["uid"]
    agent.kill()
    killed = time.monotonic()
    wait_for(lambda: status(cloud, "hosts", host).get("state") == "Disconnected", what="Disconnected", timeout=10)
    assert time.monotonic() - killed < 3 + 2, "Disconnected later than the lease duration allows"
    assert condition(cloud, "hosts", host, "Ready")["reason"] == "HeartbeatLost"
    agents.start(host + "-again", *args)
    wait_for(lambda: status(cloud, "hosts", host).get("state") == "Up", what="Up again", timeout=15)
    assert cloud.get("hosts", host)["metadata"]["uid"] == uid
    assert [h["metadata"]["name"] for h in cloud.list("hosts") if h["spec"]["cluster"] == cluster] == [host]


def test_a_simulator_fault_becomes_a_host_condition_and_clears(cloud, agents):
    zone, pod = build_zone(cloud)
    cluster, host = unique("sim"), unique("simhost")
    create_cluster(cloud, cluster, pod, "Simulator")
    agents.start(host, "--host", host, "--hypervisor", "simulator", "--register-cluster", cluster,
                 "--heartbeat-interval", "1", "--lease-duration", "3")
    wait_for(lambda: status(cloud, "hosts", host).get("state") == "Up", what="Up", timeout=30)
    fault = {"facts": {"fail": True, "message": "simulated: hypervisor does not answer"}}
    cloud.patch("hosts", host, {"metadata": {"annotations": {SIMULATOR_FAULTS_ANNOTATION: json.dumps(fault)}}})
    wait_for(lambda: condition(cloud, "hosts", host, "HypervisorHealthy").get("status") == "False",
             what="HypervisorHealthy=False", timeout=15)
    assert condition(cloud, "hosts", host, "HypervisorHealthy")["message"] == "simulated: hypervisor does not answer"
    assert condition(cloud, "hosts", host, "Ready")["reason"] == "HypervisorError"
    cloud.patch("hosts", host, {"metadata": {"annotations": {SIMULATOR_FAULTS_ANNOTATION: None}}})
    wait_for(lambda: condition(cloud, "hosts", host, "Ready").get("status") == "True", what="Ready again",
             timeout=15)


def test_two_hundred_simulated_hosts_come_up(cloud, agents, record_property):
    zone, pod = build_zone(cloud)
    cluster, prefix = unique("sim"), unique("bulk")
    create_cluster(cloud, cluster, pod, "Simulator")
    started = time.monotonic()
    agents.start(prefix, "--host", prefix, "--simulate", "200", "--hypervisor", "simulator", "--register-cluster",
                 cluster, "--heartbeat-interval", "5", "--lease-duration", "40")

    def up_count() -> int:
        return sum(1 for h in cloud.list("hosts") if h["spec"]["cluster"] == cluster
                   and (h.get("status") or {}).get("state") == "Up")

    wait_for(lambda: up_count() == 200, timeout=120, interval=0.5, what="200 hosts Up")
    elapsed = time.monotonic() - started
    record_property("seconds_to_200_hosts_up", round(elapsed, 1))
    print(f"\n200 simulated hosts Up through the controller in {elapsed:.1f}s")
    wait_for(lambda: status(cloud, "clusters", cluster).get("hosts") == 200, what="cluster host count")
