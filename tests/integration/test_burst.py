"""100 guests at once on simulated hosts: all run, no host is ever overcommitted, even when the controller
is killed and restarted in the middle of the burst; create->Running latencies are recorded."""

from __future__ import annotations

import collections
import concurrent.futures
import statistics
import time

import pytest
from kubernetes import client

pytest.register_assert_rewrite("conftest_libvirt")
from conftest_libvirt import Cloud, unique, wait_for  # noqa: E402
from simzone import create_sim_zone, wait_hosts_up  # noqa: E402

pytest_plugins = ["conftest_libvirt"]
pytestmark = [pytest.mark.usefixtures("system_namespace"), pytest.mark.timeout(300)]

GROUP, VERSION = "cumulo.io", "v1alpha1"
HOSTS, CPUS_PER_HOST, GUESTS = 10, 10, 100  # exactly full: any double booking leaves a guest without a host


def test_a_burst_of_100_guests_never_overcommits_a_host(cloud: Cloud, kube, control_plane, agents, controller,
                                                         record_property) -> None:
    custom = client.CustomObjectsApi(kube)
    base = unique("burst")
    hosts = [f"{base}-{index}" for index in range(HOSTS)]
    zone, cluster = create_sim_zone(cloud, hosts, "10.254.0")
    offering = unique("one")
    cloud.create("serviceofferings", offering, {"cpuNumber": 1, "memoryMiB": 256, "storageType": "local"})
    namespace = unique("burst")
    control_plane.kubectl("create", "namespace", namespace)
    agents.start(base, "--host", base, "--hypervisor", "simulator", "--simulate", str(HOSTS), "--register-cluster",
                 cluster, "--sim-cpus", str(CPUS_PER_HOST), "--sim-memory-mib", "65536", "--heartbeat-interval", "2",
                 "--lease-duration", "20", "--vm-resync", "5")
    wait_hosts_up(cloud, hosts, timeout=60, what="the simulated hosts Up")

    def create(plural: str, kind: str, name: str, spec: dict) -> None:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name, "namespace": namespace},
            "spec": spec})

    create("templates", "Template", "img", {"url": "file:///sim/images/img.qcow2", "zone": zone,
                                            "hypervisor": "Simulator"})
    wait_for(lambda: (custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "templates", "img")
                      .get("status") or {}).get("state") == "Ready", timeout=30, what="template Ready")

    names = [f"vm{index:03d}" for index in range(GUESTS)]
    created: dict[str, float] = {}
    running: dict[str, float] = {}

    def create_vm(name: str) -> None:
        created[name] = time.monotonic()
        create("virtualmachines", "VirtualMachine", name, {"serviceOffering": offering, "template": {"name": "img"},
                                                          "zone": zone})

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(create_vm, names[:40]))
        controller.restart(kill=True)  # a crash in the middle of placing the burst
        list(pool.map(create_vm, names[40:]))

    def poll() -> bool:
        items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "virtualmachines")["items"]
        now = time.monotonic()
        per_host: collections.Counter[str] = collections.Counter()
        for item in items:
            status = item.get("status") or {}
            host = (status.get("placement") or {}).get("host")
            if host:
                per_host[host] += 1
            if status.get("phase") == "Running":
                running.setdefault(item["metadata"]["name"], now)
        over = {h: n for h, n in per_host.items() if n > CPUS_PER_HOST}
        assert not over, f"hosts over capacity: {over}"
        return len(running) == GUESTS

    controller.wait_for_log("reconciling with")
    wait_for(poll, timeout=240, interval=0.5, what=f"{GUESTS} guests Running")
    latencies = sorted(running[name] - created[name] for name in names)
    p50, p95 = statistics.median(latencies), latencies[int(0.95 * len(latencies)) - 1]
    record_property("p50_seconds", round(p50, 2))
    record_property("p95_seconds", round(p95, 2))
    print(f"\n{GUESTS} guests on {HOSTS} simulated hosts (controller killed after 40): create->Running "
          f"p50 {p50:.2f}s p95 {p95:.2f}s max {latencies[-1]:.2f}s")
    def hosts_full() -> bool:  # a rollup: written within --rollup-delay of the last guest's change
        cores = {h: cloud.get("hosts", h)["status"]["capacity"]["cpuCores"] for h in hosts}
        return all(c["allocated"] == CPUS_PER_HOST == c["total"] for c in cores.values())
    wait_for(hosts_full, timeout=10, what="every host's capacity allocated")
