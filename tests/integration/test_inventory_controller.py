"""The inventory reconcilers against a real apiserver: references, deletion blocking, roll-ups, host monitor.

Heartbeats and agent reports here are written by the test itself (as an agent would), so these tests
pin down the controller's behaviour alone; test_cloud.py runs the real agents with it.
"""

from __future__ import annotations

import datetime
import json
import time
import typing as t
import uuid

import pytest
import yaml

from controllers.api.v1alpha1.common import SYSTEM_NAMESPACE
from controllers.api.v1alpha1.host import HEARTBEAT_LABEL, HOST_LABEL, heartbeat_lease_name

pytestmark = pytest.mark.usefixtures("controller")
ID = uuid.uuid4().hex[:5]


def apply(plane, *manifests: dict) -> None:
    plane.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(manifests))


def get(plane, kind: str, name: str, namespace: str | None = None) -> dict | None:
    args = ["get", kind, name, "-o", "json"] + (["-n", namespace] if namespace else [])
    result = plane.kubectl(*args, check=False)
    if result.returncode != 0:
        assert "NotFound" in result.stderr, result.stderr
        return None
    return json.loads(result.stdout)


def condition(obj: dict | None, type_: str) -> dict:
    for entry in ((obj or {}).get("status") or {}).get("conditions", []):
        if entry["type"] == type_:
            return entry
    return {}


def wait_for(what: str, probe: t.Callable[[], t.Any], timeout: float = 20.0) -> t.Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def cumulo(kind: str, name: str, spec: dict, namespace: str | None = None) -> dict:
    metadata: dict[str, t.Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": "cumulo.io/v1alpha1", "kind": kind, "metadata": metadata, "spec": spec}


def zone(name: str, **spec: t.Any) -> dict:
    return cumulo("Zone", name, {"networkType": "Advanced", "dns1": "192.0.2.53", **spec})


def hostpod(name: str, zone_name: str) -> dict:
    return cumulo("HostPod", name, {"zone": zone_name, "cidr": "10.250.0.0/24", "gateway": "10.250.0.1",
                                    "startIp": "10.250.0.10", "endIp": "10.250.0.20"})


def cluster(name: str, pod: str, **spec: t.Any) -> dict:
    return cumulo("Cluster", name, {"pod": pod, "hypervisorType": "Simulator", **spec})


def ready(plane, kind: str, name: str, namespace: str | None = None) -> dict:
    return condition(get(plane, kind, name, namespace), "Ready")


def test_a_missing_parent_is_reported_and_recovers_without_a_retry_storm(control_plane):
    z, p = f"zone-late-{ID}", f"pod-early-{ID}"
    apply(control_plane, hostpod(p, z))
    waiting = wait_for("ZoneNotFound", lambda: ready(control_plane, "hostpod", p).get("reason") == "ZoneNotFound"
                       and ready(control_plane, "hostpod", p))
    assert waiting["status"] == "False" and z in waiting["message"]
    version = get(control_plane, "hostpod", p)["metadata"]["resourceVersion"]
    time.sleep(3)
    assert get(control_plane, "hostpod", p)["metadata"]["resourceVersion"] == version, "status rewritten in a loop"
    apply(control_plane, zone(z))
    wait_for("the pod to become Ready", lambda: ready(control_plane, "hostpod", p).get("status") == "True")
    events = control_plane.kubectl("get", "events.events.k8s.io", "-n", "default", "--field-selector",
                                   f"regarding.name={p}", "-o", "json").stdout
    reasons = [event["reason"] for event in json.loads(events)["items"]]
    assert "ZoneNotFound" in reasons and "Ready" in reasons


def test_deleting_a_zone_with_pods_is_blocked_until_they_are_gone(control_plane):
    z, pods = f"zone-busy-{ID}", [f"pod-a-{ID}", f"pod-b-{ID}"]
    apply(control_plane, zone(z), *(hostpod(p, z) for p in pods))
    wait_for("finalizers", lambda: all((get(control_plane, k, n) or {}).get("metadata", {}).get("finalizers")
                                       for k, n in [("zone", z), ("hostpod", pods[0]), ("hostpod", pods[1])]))
    control_plane.kubectl("delete", "zone", z, "--wait=false")
    blocked = wait_for("DeletionBlocked", lambda: condition(get(control_plane, "zone", z), "DeletionBlocked"))
    assert all(f"HostPod {p}" in blocked["message"] for p in pods), blocked
    assert get(control_plane, "zone", z)["status"]["phase"] == "Deleting"
    control_plane.kubectl("delete", "hostpod", pods[0])
    time.sleep(1)
    assert get(control_plane, "zone", z) is not None, "the zone went while a pod remained"
    control_plane.kubectl("delete", "hostpod", pods[1])
    wait_for("the zone to go", lambda: get(control_plane, "zone", z) is None)


def test_an_offering_in_use_cannot_be_deleted(control_plane):
    namespace, offering, vm = f"tenant-{ID}", f"so-{ID}", f"vm-{ID}"
    control_plane.kubectl("create", "namespace", namespace)
    # The guest points at a zone and template that do not exist (only its offering matters here): the admission
    # webhook would refuse it, so the namespace opts out, as an admin may.
    control_plane.kubectl("label", "namespace", namespace, "cumulo.io/admission-webhook=disabled")
    apply(control_plane, cumulo("ServiceOffering", offering, {"cpuNumber": 1, "memoryMiB": 128}),
          cumulo("VirtualMachine", vm, {"serviceOffering": offering, "template": {"name": "t"}, "zone": "z"},
                 namespace))
    wait_for("the offering's finalizer", lambda: get(control_plane, "serviceoffering", offering)["metadata"]
             .get("finalizers"))
    wait_for("its user count", lambda: get(control_plane, "serviceoffering", offering)["status"]
             .get("virtualMachines") == 1)
    control_plane.kubectl("delete", "serviceoffering", offering, "--wait=false")
    blocked = wait_for("DeletionBlocked",
                       lambda: condition(get(control_plane, "serviceoffering", offering), "DeletionBlocked"))
    assert f"VirtualMachine {namespace}/{vm}" in blocked["message"]
    control_plane.kubectl("delete", "virtualmachine", vm, "-n", namespace)
    wait_for("the offering to go", lambda: get(control_plane, "serviceoffering", offering) is None)


def renew(plane, host: str, duration: int) -> None:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    apply(plane, {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                  "metadata": {"name": heartbeat_lease_name(host), "namespace": SYSTEM_NAMESPACE,
                               "labels": {HEARTBEAT_LABEL: host, HOST_LABEL: host}},
                  "spec": {"holderIdentity": host, "leaseDurationSeconds": duration, "renewTime": now}})


def report(plane, host: str, **node: t.Any) -> None:
    facts = {"hypervisorType": "Simulator", "cpuCores": 4, "memoryMiB": 8192, "hypervisorHealthy": True, **node}
    plane.kubectl("patch", "host", host, "--subresource=status", "--type=merge",
                  "-p", json.dumps({"status": {"node": facts}}))


def test_host_state_follows_its_heartbeat_and_capacity_rolls_up(control_plane):
    z, p, c, h = f"zone-hb-{ID}", f"pod-hb-{ID}", f"cl-hb-{ID}", f"host-hb-{ID}"
    apply(control_plane, zone(z), hostpod(p, z), cluster(c, p, cpuOvercommitRatio=2.0),
          cumulo("Host", h, {"cluster": c}))
    connecting = wait_for("Connecting", lambda: (get(control_plane, "host", h).get("status") or {})
                          .get("state") == "Connecting" and get(control_plane, "host", h))
    assert condition(connecting, "Heartbeat")["reason"] == "NoHeartbeat"
    report(control_plane, h)
    renew(control_plane, h, duration=2)
    wait_for("Up", lambda: get(control_plane, "host", h)["status"].get("state") == "Up")
    wait_for("the roll-up to the zone", lambda: ((get(control_plane, "zone", z).get("status") or {})
                                                 .get("capacity") or {}).get("cpuCores", {}).get("total") == 8)
    assert get(control_plane, "cluster", c)["status"]["capacity"]["memoryMiB"]["total"] == 8192
    assert get(control_plane, "hostpod", p)["status"]["capacity"]["cpuCores"]["total"] == 8
    assert get(control_plane, "host", h)["status"]["zone"] == z
    # No more renewals: Disconnected after the lease duration, Alert 5 s later (the fixture's setting).
    started = time.monotonic()
    wait_for("Disconnected", lambda: get(control_plane, "host", h)["status"]["state"] == "Disconnected", 10)
    assert time.monotonic() - started < 4
    assert condition(get(control_plane, "host", h), "Ready")["reason"] == "HeartbeatLost"
    wait_for("Alert", lambda: get(control_plane, "host", h)["status"]["state"] == "Alert", 15)
    renew(control_plane, h, duration=2)
    wait_for("Up again", lambda: get(control_plane, "host", h)["status"]["state"] == "Up")
    # A hypervisor error reported by the agent becomes a condition, and clears.
    report(control_plane, h, hypervisorHealthy=False, message="libvirt: connection reset")
    unhealthy = wait_for("HypervisorHealthy=False", lambda: condition(get(control_plane, "host", h),
                                                                     "HypervisorHealthy").get("status") == "False"
                         and get(control_plane, "host", h))
    assert condition(unhealthy, "HypervisorHealthy")["message"] == "libvirt: connection reset"
    report(control_plane, h)
    renew(control_plane, h, duration=2)
    wait_for("healthy again", lambda: condition(get(control_plane, "host", h), "HypervisorHealthy")
             .get("status") == "True")


def test_disabling_a_cluster_disables_its_hosts_for_placement(control_plane):
    z, p, c, h = f"zone-dis-{ID}", f"pod-dis-{ID}", f"cl-dis-{ID}", f"host-dis-{ID}"
    apply(control_plane, zone(z), hostpod(p, z), cluster(c, p), cumulo("Host", h, {"cluster": c}))
    wait_for("the host's effective allocation", lambda: (get(control_plane, "host", h).get("status") or {})
             .get("effectiveAllocationState") == "Enabled")
    apply(control_plane, cluster(c, p, allocationState="Disabled"))
    wait_for("Disabled below the cluster", lambda: get(control_plane, "host", h)["status"]
             .get("effectiveAllocationState") == "Disabled")
    assert ready(control_plane, "host", h)["reason"] in ("ClusterDisabled", "NoHeartbeat")
    assert ready(control_plane, "cluster", c)["reason"] == "Disabled"
