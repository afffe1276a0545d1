"""Usage metering through the whole stack: a guest on a simulated host runs for a measured interval; its
hourly UsageRecord shows that running time (within a tolerance), is listed by kubectl, is exported as a
metric, and survives a controller restart unchanged (nothing counted twice)."""

from __future__ import annotations

import datetime
import time
import urllib.request
from typing import Any

import pytest
from kubernetes import client

pytest.register_assert_rewrite("conftest_libvirt")
from conftest_libvirt import Cloud, unique, wait_for  # noqa: E402
from simzone import create_sim_zone  # noqa: E402

pytest_plugins = ["conftest_libvirt"]
pytestmark = [pytest.mark.usefixtures("system_namespace"), pytest.mark.timeout(240)]
GROUP, VERSION = "cumulo.io", "v1alpha1"
TOLERANCE_SECONDS = 3.0


def parse(value: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_running_hours_of_a_guest_match_the_interval_and_survive_a_restart(cloud: Cloud, kube, control_plane,
                                                                             agents, controller) -> None:
    custom = client.CustomObjectsApi(kube)
    host = unique("usagehost")
    zone, cluster = create_sim_zone(cloud, [host], "10.252.0")
    offering = unique("metered")
    cloud.create("serviceofferings", offering, {"cpuNumber": 1, "memoryMiB": 256, "storageType": "local"})
    namespace = unique("billing")
    control_plane.kubectl("create", "namespace", namespace)
    agents.start(host, "--host", host, "--hypervisor", "simulator", "--register-cluster", cluster, "--sim-cpus", "4",
                 "--sim-memory-mib", "4096", "--heartbeat-interval", "1", "--lease-duration", "10",
                 "--sim-start-seconds", "0.2", "--sim-stop-seconds", "0.2", "--vm-resync", "2")
    wait_for(lambda: (cloud.get("hosts", host).get("status") or {}).get("state") == "Up", timeout=30, what="host Up")

    def create(plural: str, kind: str, name: str, spec: dict[str, Any]) -> None:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec})

    def get(plural: str, name: str) -> dict[str, Any]:
        return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)

    def records() -> list[dict[str, Any]]:
        return [r for r in custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "usagerecords")["items"]
                if r["spec"]["kind"] == "VirtualMachine" and r["spec"]["resource"] == "metered"]

    def running_seconds() -> float:
        return sum((parse(i["end"]) - parse(i["start"])).total_seconds()
                   for r in records() for i in (r.get("status") or {}).get("running", []))

    create("templates", "Template", "img", {"url": "file:///sim/images/img.qcow2", "zone": zone,
                                            "hypervisor": "Simulator"})
    wait_for(lambda: (get("templates", "img").get("status") or {}).get("state") == "Ready", timeout=30,
             what="template Ready")
    create("virtualmachines", "VirtualMachine", "metered", {"serviceOffering": offering, "zone": zone,
                                                            "template": {"name": "img"}})
    node = wait_for(lambda: ((get("virtualmachines", "metered").get("status") or {}).get("node") or {}).get(
        "domainState") == "running" and get("virtualmachines", "metered")["status"]["node"], timeout=60,
        what="guest running")
    started = parse(node["startedAt"])
    time.sleep(6)
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "virtualmachines", "metered",
                                          {"spec": {"state": "Stopped"}})
    wait_for(lambda: ((get("virtualmachines", "metered").get("status") or {}).get("node") or {}).get(
        "domainState") != "running", timeout=30, what="guest stopped")
    stopped = datetime.datetime.now(datetime.UTC)
    measured = (stopped - started).total_seconds()
    # The run is closed in the record once the meter has seen the stop.
    wait_for(lambda: abs(running_seconds() - measured) < TOLERANCE_SECONDS, timeout=15,
             what=f"running time near {measured:.1f}s (have {running_seconds():.1f}s)")
    before = {r["metadata"]["name"]: r["status"] for r in records()}
    (record,) = [r for r in records() if r["status"].get("runningHours")] or [None]
    assert record["status"]["offering"] == offering
    assert abs(record["status"]["runningHours"] * 3600 - measured) < TOLERANCE_SECONDS
    # Allocated at least as long as it ran (allocated time counts up to meteredUntil; a stopped guest's record is
    # refreshed at the meter's checkpoint, not on every later event, so not against this test's clock).
    assert record["status"]["allocatedHours"] >= record["status"]["runningHours"]
    listed = control_plane.kubectl("get", "usagerecords", "-n", namespace).stdout
    assert record["metadata"]["name"] in listed and "VirtualMachine" in listed

    # The totals are exported for Prometheus.
    scrape = urllib.request.urlopen(f"http://127.0.0.1:{controller.metrics_port}/metrics", timeout=10).read().decode()
    line = next(line for line in scrape.splitlines() if line.startswith("cumulo_usage_vm_running_hours_total")
                and f'namespace="{namespace}"' in line)
    assert abs(float(line.split()[-1]) * 3600 - measured) < TOLERANCE_SECONDS

    # Durable: a crashed controller comes back to the same records and counts nothing twice.
    starts = controller.log().count("reconciling with")
    controller.restart()
    wait_for(lambda: controller.log().count("reconciling with") > starts, timeout=60, what="controller restarted")
    time.sleep(5)  # the meter's first pass after the start covers every guest
    after = {r["metadata"]["name"]: r["status"] for r in records()}
    assert set(after) == set(before)
    for name, status in before.items():
        assert after[name]["running"] == status["running"], name
        assert after[name].get("runningHours") == status.get("runningHours"), name
    assert abs(running_seconds() - measured) < TOLERANCE_SECONDS
