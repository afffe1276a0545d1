"""User data from a Secret on a simulated host: the guest's launch carries a reference, the agent of its host reads
the Secret when it starts the guest (seen in the apiserver's audit log and in the agent's log, by name and sha256),
a missing key shows as StartFailed until the Secret is fixed, and the content appears in no VirtualMachine, event
or log line of the agent and the controller."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import time
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

pytest.register_assert_rewrite("conftest_libvirt")
from conftest_libvirt import Cloud, unique, wait_for  # noqa: E402
from simzone import create_sim_zone  # noqa: E402

pytest_plugins = ["conftest_libvirt"]
pytestmark = [pytest.mark.usefixtures("controller", "system_namespace"), pytest.mark.timeout(180)]

GROUP, VERSION = "cumulo.io", "v1alpha1"
MARKER = "zq-s3cret-" + unique("pw")  # a string found nowhere but in the Secret


def secret_reads(plane, user: str, namespace: str, since: float) -> list[tuple[str, str]]:
    """(verb, name) of the Secret requests of ``user`` in ``namespace`` since ``since``, from the audit log."""
    found = []
    for line in plane.audit_log.read_text().splitlines():
        entry = json.loads(line)
        ref = entry.get("objectRef") or {}
        if entry.get("user", {}).get("username") != user or ref.get("resource") != "secrets" or \
                ref.get("namespace") != namespace:
            continue
        stamp = datetime.datetime.fromisoformat(entry["requestReceivedTimestamp"].replace("Z", "+00:00"))
        if stamp.timestamp() >= since:
            found.append((entry["verb"], ref.get("name", "")))
    return found


def test_user_data_secret_on_a_simulated_host(cloud: Cloud, kube, control_plane, agents) -> None:
    custom, core = client.CustomObjectsApi(kube), client.CoreV1Api(kube)
    base = unique("udhost")
    host = f"{base}-0"
    zone, cluster = create_sim_zone(cloud, [host], "10.252.0")
    offering = unique("sim")
    cloud.create("serviceofferings", offering, {"cpuNumber": 1, "cpuSpeedMHz": 1000, "memoryMiB": 512,
                                                "storageType": "local"})
    namespace = unique("tenant")
    control_plane.kubectl("create", "namespace", namespace)
    since = time.time()
    agent = agents.start(base, "--host", base, "--hypervisor", "simulator", "--simulate", "1",
                         "--register-cluster", cluster, "--heartbeat-interval", "1", "--lease-duration", "5",
                         "--vm-resync", "2")
    wait_for(lambda: (cloud.get("hosts", host).get("status") or {}).get("state") == "Up", timeout=30,
             what=f"{host} Up")

    def create(plural: str, kind: str, name: str, spec: dict[str, Any]) -> None:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name, "namespace": namespace},
            "spec": spec})

    def status(name: str, plural: str = "virtualmachines") -> dict[str, Any]:
        try:
            return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name).get("status") or {}
        except ApiException as error:
            if error.status == 404:
                return {}
            raise

    content = f"#cloud-config\nchpasswd:\n  list: |\n    root:{MARKER}\n"
    core.create_namespaced_secret(namespace, {"metadata": {"name": "web-userdata"},
                                              "stringData": {"userdata": content}})
    core.create_namespaced_secret(namespace, {"metadata": {"name": "broken-userdata"},
                                              "stringData": {"user-data": content}})  # the wrong key
    create("templates", "Template", "img", {"url": "file:///sim/images/img.qcow2", "format": "QCOW2", "zone": zone,
                                            "hypervisor": "Simulator"})
    wait_for(lambda: status("img", "templates").get("state") == "Ready", timeout=30, what="template Ready")
    for name in ("web", "broken"):
        create("virtualmachines", "VirtualMachine", name, {
            "serviceOffering": offering, "template": {"name": "img"}, "zone": zone,
            "userDataSecretRef": {"name": f"{name}-userdata"}})

    wait_for(lambda: status("web").get("phase") == "Running", timeout=40, what="web Running")
    launch = status("web")["launch"]
    assert launch["userDataSecret"] == {"namespace": namespace, "name": "web-userdata", "key": "userdata"}
    assert "userData" not in launch and launch["host"] == host
    # The agent read the Secret: the apiserver saw its GET, and it logged the Secret's name and the content's hash.
    user = f"system:cumulo-agent:{base}"
    wait_for(lambda: ("get", "web-userdata") in secret_reads(control_plane, user, namespace, since), timeout=10,
             what="the agent's GET of the Secret in the audit log")
    assert {verb for verb, _ in secret_reads(control_plane, user, namespace, since)} == {"get"}
    started = [r for r in agent.log_records() if r.get("msg") == "domain started" and
               r.get("object") == f"{namespace}/web"]
    assert started and started[-1]["user_data_secret"] == f"{namespace}/web-userdata"
    assert started[-1]["user_data_sha256"] == hashlib.sha256(content.encode()).hexdigest()

    # The wrong key: StartFailed naming the Secret and the key, retried with backoff (not a hot loop) ...
    message = f"user data Secret {namespace}/broken-userdata has no key 'userdata'"
    wait_for(lambda: (vm := status("broken")).get("phase") == "Starting" and any(
        c["reason"] == "StartFailed" and c["message"] == message for c in vm.get("conditions", [])), timeout=30,
        what="broken StartFailed with the missing key")
    assert status("broken")["node"]["message"] == message
    time.sleep(3)
    # Backoff 1, 2, 4 s plus a retry per watch event of the guest (the controller's status writes); a hot loop
    # would be hundreds.
    tries = secret_reads(control_plane, user, namespace, since).count(("get", "broken-userdata"))
    assert 1 <= tries <= 10, tries
    # ... until the Secret is fixed: the next retry reads it and the guest starts.
    core.patch_namespaced_secret("broken-userdata", namespace, {"stringData": {"userdata": content}})
    wait_for(lambda: status("broken").get("phase") == "Running", timeout=60, what="broken Running once fixed")

    # The content is nowhere but in the Secret: not in the guests (kubectl get vm -o json), events, or logs.
    leaks = {MARKER, base64.b64encode(content.encode()).decode()}
    vms = control_plane.kubectl("get", "vm", "-n", namespace, "-o", "json").stdout
    events = control_plane.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    controller_log = (control_plane.workdir / "cumulo-controller.log").read_text(errors="replace")
    for where, text in {"VMs": vms, "events": events, "agent log": agent.log(),
                        "controller log": controller_log}.items():
        assert not any(leak in text for leak in leaks), f"the user data leaked into the {where}"
    assert "web" in vms and "broken-userdata" in agent.log()
