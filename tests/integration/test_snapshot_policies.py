"""Recurring snapshot policies end to end: a controller whose policy clock runs 360 times faster (an hour in
10 s, ``--snapshot-policy-time-scale``, tests only), a real agent with filesystem storage on a private libvirtd.
An Hourly policy keeping 2 snapshots makes one snapshot per due time and deletes the oldest beyond 2."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.register_assert_rewrite("conftest_libvirt")
from conftest_libvirt import wait_for  # noqa: E402
from cumuloprocess import CumuloProcess, console_script  # noqa: E402
from privateplane import private_plane_fixtures  # noqa: E402
from libvirtcloud import build_zone, condition  # noqa: E402

pytest_plugins = ["conftest_libvirt"]
pytestmark = [pytest.mark.timeout(300)]
# The controller under test runs with a fast policy clock; the session's must not reconcile these objects.
control_plane, kube, system_namespace = private_plane_fixtures()

SCALE = 360


@pytest.fixture
def fast_controller(control_plane, system_namespace, tmp_path: Path):
    process = CumuloProcess("controller", [
        console_script("cumulo-controller"), "--kubeconfig", str(control_plane.admin_kubeconfig),
        "--host-alert-after", "5", "--metrics-port", "0", "--snapshot-policy-time-scale", str(SCALE)],
        tmp_path / "controller.log")
    try:
        process.wait_for_log("reconciling with", timeout=120)
        yield process
    finally:
        process.stop()


def test_hourly_policy_creates_snapshots_on_schedule_and_keeps_the_newest(
        fast_controller, cloud, kube, control_plane, agents, libvirtd, tmp_path, record_property) -> None:
    zone, _agent = build_zone(cloud, kube, control_plane, agents, libvirtd, tmp_path)
    objects = zone.objects
    objects.create("volumes", "Volume", "data", {
        "zone": zone.name, "storagePool": zone.pool, "sizeGiB": 1,
        "snapshotPolicies": [{"intervalType": "Hourly", "schedule": "00", "maxSnapshots": 2}]})
    objects.create("volumes", "Volume", "bad", {
        "zone": zone.name, "storagePool": zone.pool, "sizeGiB": 1,
        "snapshotPolicies": [{"intervalType": "Daily", "schedule": "25:00", "maxSnapshots": 2}]})
    bad = wait_for(lambda: condition(objects.get("volumes", "bad"), "SnapshotPolicy").get("reason") == "InvalidSchedule"
                   and condition(objects.get("volumes", "bad"), "SnapshotPolicy"), timeout=60,
                   what="the bad schedule refused")
    assert "hour 0-23" in bad["message"]
    assert condition(objects.get("volumes", "data"), "SnapshotPolicy").get("status") == "True"

    seen: set[str] = set()
    started = time.monotonic()

    def policy_snapshots() -> list[dict]:
        found = [s for s in objects.custom.list_namespaced_custom_object(
            "cumulo.io", "v1alpha1", objects.namespace, "snapshots")["items"]
            if (s["metadata"].get("labels") or {}).get("cumulo.io/snapshot-policy") == "Hourly"]
        seen.update(s["metadata"]["name"] for s in found)
        return found

    wait_for(lambda: policy_snapshots() and len(seen) >= 3, timeout=120, interval=0.5,
             what="three due times of the Hourly policy")
    figures = {"three_hourly_snapshots_s": time.monotonic() - started}

    def settled():
        live = policy_snapshots()  # the deleted ones included until the agent removed their copies
        names = sorted(s["metadata"]["name"] for s in live)
        return len(live) == 2 and all((s.get("status") or {}).get("phase") == "BackedUp" for s in live) and names

    try:
        kept = wait_for(settled, timeout=60, interval=0.2, what="two BackedUp snapshots kept")
    except AssertionError as error:
        state = [(s["metadata"]["name"], (s.get("status") or {}).get("phase"), s["metadata"].get("deletionTimestamp"),
                  (s.get("status") or {}).get("node")) for s in policy_snapshots()]
        raise AssertionError(f"{error}: {state}\n{fast_controller.log()[-3000:]}") from None
    # The newest two due times are kept (names carry the due time, so they sort by it).
    assert kept == sorted(seen)[-2:], (kept, sorted(seen))
    assert all(name.startswith("data-hourly-") for name in seen)
    # No snapshot of the bad schedule, and no more than one per due time (names are unique per due time).
    assert not [s for s in seen if s.startswith("bad-")]
    # Retention removed the copies of the deleted ones: only the kept snapshots' backups remain on the store.
    backups = sorted(p.name for p in (zone.store_path / "snapshots").rglob("*.qcow2"))
    assert len(backups) == 2 and all(any(b.startswith(k) for k in kept) for b in backups), backups
    for name, value in figures.items():
        record_property(name, round(value, 2))
        print(f"{name}: {value:.2f}")
