"""Which pools, stores and bridges a host checks, and when a report is worth a write (hostagent.inventory)."""

from __future__ import annotations

import datetime

import pytest

from hostagent import inventory
from hostagent.inventory import Placement, StorageTarget


def pool(name, scope, type="Filesystem", *, zone="z1", host=None, cluster=None, path="/p"):
    spec = {"zone": zone, "scope": scope, "type": type}
    if host:
        spec["host"] = host
    if cluster:
        spec["cluster"] = cluster
    if type == "RBD":
        spec["rbd"] = {"monitors": ["m:6789"], "pool": "rbd", "secretRef": {"name": "s", "key": "k"}}
    else:
        spec["path"] = f"{path}/{name}"
    return {"metadata": {"name": name}, "spec": spec}


POOLS = [
    pool("local-h1", "Host", host="h1"),
    pool("local-h2", "Host", host="h2"),
    pool("shared-c1", "Cluster", "SharedMountPoint", cluster="c1"),
    pool("shared-c2", "Cluster", "SharedMountPoint", cluster="c2"),
    pool("zone-z1", "Zone", "SharedMountPoint"),
    pool("zone-z2", "Zone", "SharedMountPoint", zone="z2"),
    pool("ceph-z1", "Zone", "RBD"),
]


def test_host_without_zone_checks_only_its_own_host_pools():
    targets = inventory.pools_for_host(Placement("h1", "c1", None), POOLS)
    assert targets == [StorageTarget("local-h1", "/p/local-h1", create=True)]


def test_host_with_zone_checks_host_cluster_and_zone_pools():
    targets = inventory.pools_for_host(Placement("h1", "c1", "z1"), POOLS)
    assert [target.name for target in targets] == ["ceph-z1", "local-h1", "shared-c1", "zone-z1"]
    by_name = {target.name: target for target in targets}
    # Filesystem pools are the host's local storage: created. Shared mounts never are.
    assert by_name["local-h1"].create is True
    assert by_name["shared-c1"].create is False and by_name["zone-z1"].create is False
    # An RBD pool is checked through Ceph: its spec.rbd goes along, path is the Ceph pool.
    assert by_name["ceph-z1"].unsupported is None and by_name["ceph-z1"].rbd is not None
    assert by_name["ceph-z1"].path == by_name["ceph-z1"].rbd["pool"]


def test_other_hosts_clusters_and_zones_are_not_checked():
    targets = inventory.pools_for_host(Placement("h3", "c3", "z3"), POOLS)
    assert targets == []


def test_image_stores_of_the_zone_only_once_zone_known():
    stores = [
        {"metadata": {"name": "s1"}, "spec": {"zone": "z1", "path": "/s1"}},
        {"metadata": {"name": "s2"}, "spec": {"zone": "z2", "path": "/s2"}},
        {"metadata": {"name": "s3"}, "spec": {"zone": "z1", "path": "/s3", "readOnly": True}},
    ]
    assert inventory.stores_for_host(Placement("h1", "c1", None), stores) == []
    assert inventory.stores_for_host(Placement("h1", "c1", "z1"), stores) == [
        StorageTarget("s1", "/s1", create=False, writable=True),
        StorageTarget("s3", "/s3", create=False, writable=False),
    ]


def test_bridge_labels_of_the_zones_physical_networks():
    networks = [
        {"metadata": {"name": "n1"}, "spec": {"zone": "z1", "trafficTypes": [
            {"type": "Guest", "label": "cloudbr1"}, {"type": "Management", "label": "cloudbr0"}]}},
        {"metadata": {"name": "n2"}, "spec": {"zone": "z1", "trafficTypes": [{"type": "Public", "label": "cloudbr0"}]}},
        {"metadata": {"name": "n3"}, "spec": {"zone": "z2", "trafficTypes": [{"type": "Guest", "label": "other"}]}},
    ]
    assert inventory.bridge_labels_for_host(Placement("h1", "c1", "z1"), networks) == ["cloudbr0", "cloudbr1"]
    assert inventory.bridge_labels_for_host(Placement("h1", "c1", None), networks) == []


def test_placement_from_host_object():
    host = {"metadata": {"name": "h1"}, "spec": {"cluster": "c1"}, "status": {"zone": "z1", "pod": "p1"}}
    assert Placement.of(host) == Placement("h1", "c1", "z1")
    assert Placement.of({"metadata": {"name": "h1"}, "spec": {"cluster": "c1"}}) == Placement("h1", "c1", None)


def test_host_inputs_ignore_status_node_and_conditions():
    host = {"metadata": {"name": "h1", "uid": "u1", "annotations": {}}, "spec": {"cluster": "c1"},
            "status": {"zone": "z1", "node": {"cpuCores": 2}, "conditions": []}}
    changed_status = {**host, "status": {"zone": "z1", "node": {"cpuCores": 4}, "conditions": [{"type": "Ready"}]}}
    assert inventory.host_inputs(host) == inventory.host_inputs(changed_status)
    annotated = {**host, "metadata": {**host["metadata"], "annotations": {
        "cumulo.io/simulator-faults": '{"facts": {"fail": true}}'}}}
    assert inventory.host_inputs(host) != inventory.host_inputs(annotated)
    assert inventory.host_inputs(host) != inventory.host_inputs({**host, "status": {"zone": "z2"}})
    assert inventory.host_inputs(None) == (None,)


# -- patch minimisation --------------------------------------------------------------------


NOW = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.timezone.utc)


def report(reported_at=NOW, used=50 * 2**30, **overrides):
    node = {
        "hypervisorType": "KVM", "cpuCores": 2, "memoryMiB": 4096, "hypervisorHealthy": True, "message": "",
        "libvirtVersion": "9.0.0",
        "storagePools": {"p1": {"reachable": True, "message": "", "capacityBytes": 100 * 2**30, "usedBytes": used}},
        "imageStores": {}, "bridges": {"cloudbr0": True},
        "reportedAt": reported_at.isoformat().replace("+00:00", "Z"),
    }
    node.update(overrides)
    return node


def test_first_report_is_needed():
    assert inventory.needs_report(None, report(), now=NOW, refresh_seconds=60)


def test_only_reported_at_changed_is_not_worth_a_write():
    previous = report(NOW - datetime.timedelta(seconds=30))
    assert not inventory.significant_change(previous, report())
    assert not inventory.needs_report(previous, report(), now=NOW, refresh_seconds=60)


def test_unchanged_report_is_refreshed_after_the_refresh_period():
    previous = report(NOW - datetime.timedelta(seconds=61))
    assert inventory.needs_report(previous, report(), now=NOW, refresh_seconds=60)


def test_small_used_bytes_moves_wait_for_the_refresh_but_large_ones_do_not():
    previous = report(NOW - datetime.timedelta(seconds=5))
    assert not inventory.needs_report(previous, report(used=50 * 2**30 + 2**20), now=NOW, refresh_seconds=60)
    assert inventory.needs_report(previous, report(used=52 * 2**30), now=NOW, refresh_seconds=60)


@pytest.mark.parametrize("change", [
    {"hypervisorHealthy": False, "message": "libvirt down"},
    {"cpuCores": 4},
    {"bridges": {"cloudbr0": False}},
    {"bridges": {}},
    {"storagePools": {"p1": {"reachable": False, "message": "directory /p1 does not exist"}}},
    {"imageStores": {"s1": {"reachable": True, "message": "", "capacityBytes": 1, "usedBytes": 0}}},
])
def test_fact_health_and_reachability_changes_are_written_at_once(change):
    previous = report(NOW - datetime.timedelta(seconds=1))
    assert inventory.needs_report(previous, report(**change), now=NOW, refresh_seconds=60)


def test_none_values_compare_as_absent():
    previous = report()
    del previous["libvirtVersion"]
    assert not inventory.significant_change(previous, report(libvirtVersion=None))


def test_patch_removes_what_is_no_longer_reported():
    previous = report()
    current = report(libvirtVersion=None, bridges={},
                     storagePools={"p1": {"reachable": False, "message": "gone", "capacityBytes": None,
                                          "usedBytes": None}})
    patch = inventory.node_patch(previous, current)
    assert patch["libvirtVersion"] is None
    assert patch["bridges"] == {"cloudbr0": None}
    assert patch["storagePools"] == {"p1": {"reachable": False, "message": "gone", "capacityBytes": None,
                                            "usedBytes": None}}


def test_patch_has_no_idle_nulls():
    current = report(libvirtVersion=None, virtType=None)
    patch = inventory.node_patch(None, current)
    assert "libvirtVersion" not in patch and "virtType" not in patch
    assert patch["cpuCores"] == 2


def apply_merge_patch(target, patch):
    """RFC 7386, to check that the patch does turn previous into current."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result


def test_patch_applied_to_previous_gives_current():
    previous = report(storagePools={"p1": {"reachable": True, "message": "", "capacityBytes": 5, "usedBytes": 1},
                                    "p2": {"reachable": True, "message": "", "capacityBytes": 5, "usedBytes": 1}})
    current = report(storagePools={"p1": {"reachable": False, "message": "x", "capacityBytes": None,
                                          "usedBytes": None}}, imageStores={"s": {"reachable": True}})
    assert apply_merge_patch(previous, inventory.node_patch(previous, current)) == inventory.prune(current)
