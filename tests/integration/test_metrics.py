"""Metrics end to end: the session controller and a simulated agent serve /metrics, and what they export matches
the cloud after guests run (objects per phase as the API lists them, per-zone capacity and hosts, placements,
reconcile counts; the agent's domains, driver operations and heartbeats)."""

from __future__ import annotations

import urllib.request
from typing import Any

import pytest
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

pytest.register_assert_rewrite("conftest_libvirt")
from cumuloprocess import free_port  # noqa: E402
from conftest_libvirt import Cloud, unique, wait_for  # noqa: E402
from simzone import create_sim_zone  # noqa: E402

pytest_plugins = ["conftest_libvirt"]
pytestmark = [pytest.mark.usefixtures("controller", "system_namespace"), pytest.mark.timeout(180)]

GROUP, VERSION = "cumulo.io", "v1alpha1"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body) for sample in family.samples}


def total(samples: Samples, metric: str, /, **labels: str) -> float:
    """The sum over ``metric``'s series whose labels include ``labels``."""
    return sum(value for (name, series), value in samples.items()
               if name == metric and set(labels.items()) <= set(series))


def test_controller_and_agent_metrics_reflect_a_simulated_cloud(cloud: Cloud, kube, control_plane, agents,
                                                                controller) -> None:
    custom = client.CustomObjectsApi(kube)
    base = unique("mhost")
    hosts = [f"{base}-{index}" for index in range(2)]
    before = scrape(controller.metrics_port)
    zone, cluster = create_sim_zone(cloud, hosts, "10.252.0")
    offering = unique("msim")
    cloud.create("serviceofferings", offering, {"cpuNumber": 1, "cpuSpeedMHz": 1000, "memoryMiB": 512,
                                                "storageType": "local"})
    namespace = unique("tenant")
    control_plane.kubectl("create", "namespace", namespace)
    agent_port = free_port()
    agents.start(base, "--host", base, "--hypervisor", "simulator", "--simulate", "2", "--register-cluster", cluster,
                 "--sim-cpus", "4", "--sim-memory-mib", "4096", "--heartbeat-interval", "1", "--lease-duration", "5",
                 "--vm-resync", "2", "--metrics-port", str(agent_port), "--metrics-address", "127.0.0.1")
    for host in hosts:
        wait_for(lambda h=host: (cloud.get("hosts", h).get("status") or {}).get("state") == "Up", timeout=30,
                 what=f"{host} Up")

    def create(plural: str, kind: str, name: str, spec: dict[str, Any]) -> None:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name, "namespace": namespace},
            "spec": spec})

    def status(plural: str, name: str) -> dict[str, Any]:
        return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name).get("status") or {}

    create("templates", "Template", "img", {"url": "file:///sim/images/img.qcow2", "format": "QCOW2", "zone": zone,
                                            "hypervisor": "Simulator"})
    wait_for(lambda: status("templates", "img").get("state") == "Ready", timeout=30, what="template Ready")
    names = ["vm0", "vm1", "vm2"]
    for name in names:
        create("virtualmachines", "VirtualMachine", name, {"serviceOffering": offering, "template": {"name": "img"},
                                                          "zone": zone})
    wait_for(lambda: all(status("virtualmachines", name).get("phase") == "Running" for name in names), timeout=40,
             what="the guests Running")
    placed = {name: status("virtualmachines", name)["placement"]["host"] for name in names}

    # Objects per phase: what the API lists, across the cloud (other tests' objects included).
    def phases(plural: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for item in custom.list_cluster_custom_object(GROUP, VERSION, plural)["items"]:
            phase = (item.get("status") or {}).get("phase") or "Unknown"
            counts[phase] = counts.get(phase, 0) + 1
        return counts

    def exported(samples: Samples, kind: str) -> dict[str, int]:
        return {dict(series)["phase"]: int(value) for (name, series), value in samples.items()
                if name == "cumulo_objects" and dict(series)["kind"] == kind and value}

    def matches() -> bool:
        samples = scrape(controller.metrics_port)
        return all(exported(samples, kind) == phases(plural) for kind, plural in (
            ("VirtualMachine", "virtualmachines"), ("Host", "hosts"), ("Zone", "zones")))

    wait_for(matches, timeout=20, what="objects per phase as the API has them")
    # Hosts' capacity is a rollup written at most once per --rollup-delay (1 s) after their guests change.
    wait_for(lambda: total(scrape(controller.metrics_port), "cumulo_host_cpu_allocated_cores", zone=zone) == 3,
             timeout=20, what="the hosts' allocated capacity")
    after = scrape(controller.metrics_port)
    assert total(after, "cumulo_objects", kind="VirtualMachine", phase="Running") >= 3
    assert total(after, "cumulo_hosts", zone=zone, cluster=cluster, state="Up", resource_state="Enabled") == 2
    assert total(after, "cumulo_host_cpu_capacity_cores", zone=zone) == 8
    assert total(after, "cumulo_host_cpu_allocated_cores", zone=zone) == 3
    assert total(after, "cumulo_host_memory_allocated_bytes", zone=zone, cluster=cluster) == 3 * 512 * 2**20
    for host in hosts:
        assert total(after, "cumulo_host_virtual_machines", host=host) == list(placed.values()).count(host)
    assert total(after, "cumulo_placement_duration_seconds_count", zone=zone) == 3
    assert total(after, "cumulo_controller_active") == 1 and total(after, "cumulo_workqueue_depth") >= 0

    # Reconciles were counted for each kind this test touched.
    for kind, at_least in (("VirtualMachine", 3 * 3), ("Volume", 3), ("Template", 1), ("Host", 2), ("Zone", 1)):
        grew = total(after, "cumulo_reconcile_duration_seconds_count", kind=kind) - \
            total(before, "cumulo_reconcile_duration_seconds_count", kind=kind)
        assert grew >= at_least, (kind, grew)
    assert total(after, "cumulo_host_state_transitions_total", to_state="Up") - \
        total(before, "cumulo_host_state_transitions_total", to_state="Up") >= 2

    # The agent: both simulated hosts, their domains, the driver operations and heartbeats behind them.
    def agent_domains() -> dict[str, float]:
        samples = scrape(agent_port)
        return {host: total(samples, "cumulo_agent_domains", host=host, state="running") for host in hosts}

    expected = {host: float(list(placed.values()).count(host)) for host in hosts}
    wait_for(lambda: agent_domains() == expected, timeout=30, what=f"the agent's domains per host {expected}")
    samples = scrape(agent_port)
    assert total(samples, "cumulo_agent_hosts") == 2
    for host in hosts:
        starts = total(samples, "cumulo_agent_driver_operation_duration_seconds_count", host=host,
                       driver="hypervisor", operation="start")
        assert starts == expected[host], (host, starts)
        assert total(samples, "cumulo_agent_driver_operation_duration_seconds_count", host=host, driver="storage",
                     operation="create_disk") == expected[host]
        assert total(samples, "cumulo_agent_heartbeat_renew_duration_seconds_count", host=host) >= 1
        assert total(samples, "cumulo_agent_hypervisor_healthy", host=host) == 1
        assert total(samples, "cumulo_agent_host_cpu_cores", host=host) == 4
        assert total(samples, "cumulo_agent_storage_reachable", host=host, type="pool", name=f"{host}-local") == 1
    assert total(samples, "cumulo_agent_driver_operation_failures_total") == 0
