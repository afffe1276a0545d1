"""Two cumulo-controllers with --leader-elect on one control plane: one reconciles, the other stands by; when the
leader is killed the standby takes over within the lease duration and reconciles; a leader stopped cleanly
releases the Lease, so the standby takes over at once.

A control plane of its own (privateplane): the session's controller, without leader election, would reconcile
the same objects.
"""

from __future__ import annotations

import json
import sys
import time
import typing as t
import urllib.request
import uuid
from pathlib import Path

import yaml

from controllers.api.v1alpha1.common import SYSTEM_NAMESPACE
from cumuloprocess import CumuloProcess as Process
from cumuloprocess import free_port
from privateplane import private_plane_fixtures

control_plane, kube, system_namespace = private_plane_fixtures()

LEASE_DURATION, RENEW_DEADLINE, RETRY_PERIOD = 6, 4, 1



def controller(plane, identity: str, health_port: int = 0) -> Process:
    return Process(f"controller-{identity}", [
        str(Path(sys.executable).with_name("cumulo-controller")), "--kubeconfig", str(plane.admin_kubeconfig),
        "--leader-elect", "--leader-identity", identity, "--lease-duration", str(LEASE_DURATION),
        "--renew-deadline", str(RENEW_DEADLINE), "--retry-period", str(RETRY_PERIOD), "--metrics-port", "0",
        "--health-port", str(health_port),
    ], plane.workdir / f"controller-{identity}.log")


def healthy(port: int) -> bool:
    """kopf's liveness endpoint, the chart's liveness and readiness probe."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def lease(plane) -> dict:
    result = plane.kubectl("get", "lease", "cumulo-controller", "-n", SYSTEM_NAMESPACE, "-o", "json")
    return json.loads(result.stdout)["spec"]


def zone_ready(plane, name: str) -> bool:
    result = plane.kubectl("get", "zone", name, "-o", "json", check=False)
    if result.returncode != 0:
        return False
    conditions = (json.loads(result.stdout).get("status") or {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def apply_zone(plane, name: str) -> None:
    plane.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "cumulo.io/v1alpha1", "kind": "Zone", "metadata": {"name": name},
        "spec": {"networkType": "Advanced", "dns1": "192.0.2.53"}}))


def wait_for(what: str, probe: t.Callable[[], t.Any], timeout: float) -> float:
    """Wait for ``probe``; return the seconds it took."""
    started = time.monotonic()
    while not probe():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - started


def test_the_standby_takes_over_when_the_leader_dies_and_at_once_when_it_stops(control_plane):
    first, second = f"a-{uuid.uuid4().hex[:4]}", f"b-{uuid.uuid4().hex[:4]}"
    a = controller(control_plane, first)
    b = None
    try:
        a.wait_for_log("leading: primed")
        health = free_port()
        b = controller(control_plane, second, health)
        b.wait_for_log("standing by")
        wait_for("the standby's health endpoint", lambda: healthy(health), 20)  # a standby is Ready too
        assert lease(control_plane)["holderIdentity"] == first

        apply_zone(control_plane, "le-zone-1")
        wait_for("the leader to reconcile", lambda: zone_ready(control_plane, "le-zone-1"), 20)
        assert "leading" not in b.log()  # the standby reconciled nothing

        a.stop(kill=True)  # a crash: the Lease is not released
        killed = time.monotonic()
        apply_zone(control_plane, "le-zone-2")
        wait_for("the standby to take over", lambda: "leading: primed" in b.log(), LEASE_DURATION + 2 * RETRY_PERIOD)
        wait_for("the new leader to reconcile", lambda: zone_ready(control_plane, "le-zone-2"), 20)
        took_over = time.monotonic() - killed
        spec = lease(control_plane)
        assert spec["holderIdentity"] == second and spec["leaseTransitions"] == 1
        assert took_over < LEASE_DURATION + 2 * RETRY_PERIOD + 5, took_over

        a = controller(control_plane, first)  # back as a standby
        a.wait_for_log("standing by")
        b.stop()  # SIGTERM: stops reconciling, releases the Lease
        assert b.popen.returncode == 0, b.log()[-3000:]
        handover = wait_for("the released Lease to be taken", lambda: "leading: primed" in a.log(),
                            LEASE_DURATION)
        assert handover < LEASE_DURATION - 1, handover  # no wait for expiry
        apply_zone(control_plane, "le-zone-3")
        wait_for("the third zone", lambda: zone_ready(control_plane, "le-zone-3"), 20)
    finally:
        a.stop()
        if b is not None:
            b.stop()
