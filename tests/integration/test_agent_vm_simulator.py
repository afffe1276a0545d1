"""Virtual machines on simulated hosts: one agent process runs three simulated hosts (set-based label selector), the
controller places guests on them; templates, root volumes, starts, faults and stops go through the same reconcilers
as on libvirt, with the simulator's in-memory domains and disks."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

pytest.register_assert_rewrite("conftest_libvirt")
from conftest_libvirt import Cloud, unique, wait_for  # noqa: E402
from simzone import create_sim_zone  # noqa: E402

from controllers.api.v1alpha1.host import SIMULATOR_FAULTS_ANNOTATION  # noqa: E402

pytest_plugins = ["conftest_libvirt"]
pytestmark = [pytest.mark.usefixtures("controller", "system_namespace"), pytest.mark.timeout(180)]

GROUP, VERSION = "cumulo.io", "v1alpha1"


def test_guests_on_simulated_hosts_with_faults(cloud: Cloud, kube, control_plane, agents) -> None:
    custom = client.CustomObjectsApi(kube)
    base = unique("simhost")
    hosts = [f"{base}-{index}" for index in range(3)]
    zone, cluster = create_sim_zone(cloud, hosts, "10.253.0")
    offering = unique("sim")
    cloud.create("serviceofferings", offering, {"cpuNumber": 1, "cpuSpeedMHz": 1000, "memoryMiB": 512,
                                                "storageType": "local"})
    namespace = unique("tenant")
    control_plane.kubectl("create", "namespace", namespace)
    agents.start(base, "--host", base, "--hypervisor", "simulator", "--simulate", "3", "--register-cluster", cluster,
                 "--sim-cpus", "4", "--sim-memory-mib", "4096", "--heartbeat-interval", "1", "--lease-duration", "5",
                 "--sim-start-seconds", "0.2", "--sim-stop-seconds", "0.3", "--vm-resync", "2")
    for host in hosts:
        wait_for(lambda h=host: (cloud.get("hosts", h).get("status") or {}).get("state") == "Up", timeout=30,
                 what=f"{host} Up")

    def create(plural: str, kind: str, name: str, spec: dict[str, Any]) -> None:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name, "namespace": namespace},
            "spec": spec})

    def status(plural: str, name: str) -> dict[str, Any]:
        try:
            return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name).get("status") or {}
        except ApiException as error:
            if error.status == 404:
                return {}
            raise

    create("templates", "Template", "img", {"url": "file:///sim/images/img.qcow2", "format": "QCOW2", "zone": zone,
                                            "hypervisor": "Simulator"})
    template = wait_for(lambda: (s := status("templates", "img")).get("state") == "Ready" and s, timeout=30,
                        what="template Ready")
    assert template["detectedFormat"] == "QCOW2" and template["download"]["host"] in hosts

    # A start fault on the first host: the guest placed there reports it, the others run.
    fault = {"start": {"fail": True, "message": "simulated: cannot allocate memory"}}
    cloud.patch("hosts", hosts[0], {"metadata": {"annotations": {SIMULATOR_FAULTS_ANNOTATION: json.dumps(fault)}}})
    names = [f"vm{index}" for index in range(6)]
    started = time.monotonic()
    for name in names:
        create("virtualmachines", "VirtualMachine", name, {"serviceOffering": offering, "template": {"name": "img"},
                                                          "zone": zone})

    def placed(name: str) -> str | None:
        return (status("virtualmachines", name).get("placement") or {}).get("host")

    try:
        wait_for(lambda: all(placed(name) for name in names), timeout=30, what="all placed")
    except AssertionError as error:
        raise AssertionError(f"{error}: {[status('virtualmachines', name).get('conditions') for name in names]}, "
                             f"{status('volumes', 'vm0-root')}") from None
    faulty = [name for name in names if placed(name) == hosts[0]]
    healthy = [name for name in names if placed(name) != hosts[0]]
    wait_for(lambda: all(status("virtualmachines", name).get("phase") == "Running" for name in healthy), timeout=30,
             what="the guests on healthy hosts Running")
    print(f"{len(healthy)} simulated guests Running {time.monotonic() - started:.1f}s after creation")
    for name in healthy:
        node = status("virtualmachines", name)["node"]
        assert node["domainState"] == "running" and node["host"] == placed(name)
        assert node["disks"] == [f"{name}-root"] and "consoleLog" not in node
    for name in faulty:
        wait_for(lambda n=name: status("virtualmachines", n).get("node", {}).get("message") ==
                 "simulated: cannot allocate memory", timeout=20, what=f"{name} reporting the start fault")
        assert status("virtualmachines", name)["phase"] == "Starting"

    # The fault is lifted: the agent's backoff retries and the guests start.
    cloud.patch("hosts", hosts[0], {"metadata": {"annotations": {SIMULATOR_FAULTS_ANNOTATION: None}}})
    wait_for(lambda: all(status("virtualmachines", name).get("phase") == "Running" for name in faulty), timeout=40,
             what="the faulty host's guests Running after the fault is lifted")

    # Stopped: every guest stops (simulated ACPI shutdown) and its placement is released.
    for name in names:
        custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "virtualmachines", name,
                                              {"spec": {"state": "Stopped"}})
    wait_for(lambda: all(status("virtualmachines", name).get("phase") == "Stopped" for name in names), timeout=30,
             what="all Stopped")
    for name in names:
        assert status("virtualmachines", name)["node"]["domainState"] == "shutoff"
