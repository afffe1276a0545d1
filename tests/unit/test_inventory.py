"""Status derivation of the infrastructure kinds, on objects built in memory."""

import datetime

from controllers import inventory
from controllers.api import v1alpha1 as api
from controllers.api.v1alpha1.host import HostState
from controllers.conditions import Check, find

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
CTX = inventory.Context(now=NOW)
GIB = 1024**3


def make(model, name, spec, status=None, namespace=None):
    meta = {"name": name, "generation": 1}
    if namespace:
        meta["namespace"] = namespace
    return model.model_validate({"apiVersion": "cumulo.io/v1alpha1", "kind": model._meta.kind, "metadata": meta,
                                 "spec": spec, "status": status or {}})


ZONE = make(api.Zone, "z1", {"networkType": "Advanced", "dns1": "8.8.8.8"})
POD = make(api.HostPod, "p1", {"zone": "z1", "cidr": "10.0.0.0/24", "gateway": "10.0.0.1", "startIp": "10.0.0.10",
                               "endIp": "10.0.0.20"}, {"effectiveAllocationState": "Enabled"})
CLUSTER = make(api.Cluster, "c1", {"pod": "p1", "cpuOvercommitRatio": 2.0, "memoryOvercommitRatio": 1.5},
               {"zone": "z1", "effectiveAllocationState": "Enabled"})
NODE = {"hypervisorType": "KVM", "cpuCores": 4, "memoryMiB": 8192, "hypervisorHealthy": True,
        "storagePools": {"local1": {"reachable": True, "capacityBytes": 100 * GIB, "usedBytes": 10 * GIB}},
        "bridges": {"cloudbr0": True, "cloudbr1": False}}
HOST = make(api.Host, "h1", {"cluster": "c1"}, {"node": NODE, "zone": "z1"})
UP = (HostState.UP, Check.passed("LeaseRenewed"))


def vm(name, cpus, memory):
    return inventory.Guest(cpus, memory)


def test_host_capacity_applies_the_clusters_overcommit_ratios_and_counts_guests():
    status = inventory.host_status(HOST, CLUSTER, UP, [vm("a", 2, 1024), vm("b", 1, 512)], [], CTX)
    assert status.capacity.cpu_cores.total == 8 and status.capacity.cpu_cores.allocated == 3
    assert status.capacity.memory_mib.total == 12288 and status.capacity.memory_mib.allocated == 1536
    assert status.state == HostState.UP and status.phase == "Up" and status.virtual_machines == 2
    assert find(status.conditions, "Ready").status.value == "True"
    assert status.zone == "z1" and status.pod == "p1"


def test_host_under_a_missing_cluster_is_not_ready_with_the_reason():
    status = inventory.host_status(HOST, None, UP, [], [], CTX)
    ready = find(status.conditions, "Ready")
    assert ready.status.value == "False" and ready.reason == "ClusterNotFound" and "c1" in ready.message
    assert status.effective_allocation_state == api.common.AllocationState.DISABLED


def test_host_with_a_failing_hypervisor_reports_its_message():
    sick = make(api.Host, "h1", {"cluster": "c1"}, {"node": {**NODE, "hypervisorHealthy": False,
                                                              "message": "injected failure"}})
    status = inventory.host_status(sick, CLUSTER, UP, [], [], CTX)
    assert find(status.conditions, "HypervisorHealthy").message == "injected failure"
    assert find(status.conditions, "Ready").reason == "HypervisorError"


def test_maintenance_waits_for_guests_to_leave():
    host = make(api.Host, "h1", {"cluster": "c1", "maintenance": True}, {"node": NODE})
    assert inventory.host_status(host, CLUSTER, UP, [vm("a", 1, 128)], [], CTX).resource_state.value == \
        "PrepareForMaintenance"
    assert inventory.host_status(host, CLUSTER, UP, [], [], CTX).resource_state.value == "Maintenance"


def test_disabled_parent_disables_the_child_for_placement():
    disabled_zone = make(api.Zone, "z1", {"networkType": "Advanced", "dns1": "8.8.8.8", "allocationState": "Disabled"})
    status = inventory.hostpod_status(POD, disabled_zone, [], CTX)
    assert find(status.conditions, "Ready").reason == "ZoneDisabled"
    assert status.effective_allocation_state.value == "Disabled" and status.phase == "Disabled"


def test_capacity_rolls_up_cluster_pod_zone():
    host_status = inventory.host_status(HOST, CLUSTER, UP, [vm("a", 2, 1024)], [], CTX)
    host = HOST.model_copy(update={"status": host_status})
    cluster = CLUSTER.model_copy(update={"status": inventory.cluster_status(CLUSTER, POD, [host, host], [], CTX)})
    assert cluster.status.capacity.cpu_cores.total == 16 and cluster.status.hosts == 2
    pod = POD.model_copy(update={"status": inventory.hostpod_status(POD, ZONE, [cluster], CTX)})
    zone_pool = make(api.StoragePool, "zp", {"zone": "z1", "scope": "Zone", "type": "SharedMountPoint",
                                             "path": "/mnt/x", "overprovisioningFactor": 2.0},
                     {"capacityBytes": 10 * GIB, "allocatedBytes": GIB + 1})
    zone = inventory.zone_status(ZONE, [pod], 2, [zone_pool], CTX)
    assert zone.capacity.memory_mib.allocated == 2048
    assert zone.capacity.primary_storage_gib.total == 20 and zone.capacity.primary_storage_gib.allocated == 2


def test_pool_reachability_and_capacity_come_from_host_reports():
    pool = make(api.StoragePool, "local1", {"zone": "z1", "scope": "Host", "type": "Filesystem", "host": "h1",
                                            "path": "/var/lib/cumulo/pools/local1"})
    status = inventory.pool_status(pool, ZONE, HOST, [HOST], [], CTX)
    assert status.state.value == "Up" and status.capacity_bytes == 100 * GIB
    assert status.host_access["h1"].reachable
    unreported = inventory.pool_status(pool, ZONE, HOST, [make(api.Host, "h1", {"cluster": "c1"})], [], CTX)
    assert find(unreported.conditions, "Ready").reason == "NotReported" and unreported.state is None
    broken_node = {**NODE, "storagePools": {"local1": {"reachable": False, "message": "not writable"}}}
    broken = inventory.pool_status(pool, ZONE, HOST, [make(api.Host, "h1", {"cluster": "c1"}, {"node": broken_node})],
                                   [], CTX)
    assert broken.state.value == "Error" and "not writable" in find(broken.conditions, "Ready").message


def test_missing_bridges_are_named_per_host():
    pnet = make(api.PhysicalNetwork, "pn", {"zone": "z1", "trafficTypes": [
        {"type": "Guest", "label": "cloudbr0"}, {"type": "Public", "label": "cloudbr1"}],
        "vnetRanges": [{"start": 100, "end": 199}],
        "publicIpRanges": [{"cidr": "203.0.113.0/24", "gateway": "203.0.113.1", "startIp": "203.0.113.10",
                            "endIp": "203.0.113.19"}]})
    status = inventory.physical_network_status(pnet, ZONE, [HOST], 3, 1, CTX)
    ready = find(status.conditions, "Ready")
    assert ready.reason == "BridgeMissing" and "cloudbr1 (Public) on h1" in ready.message
    assert (status.vnets_total, status.vnets_allocated, status.public_ips_total) == (100, 3, 10)


def test_blocked_deletion_names_the_dependents():
    ctx = inventory.Context(now=NOW, blocked_by=("HostPod p1", "StoragePool zp"), deleting=True)
    status = inventory.zone_status(ZONE, [], 0, [], ctx)
    blocked = find(status.conditions, "DeletionBlocked")
    assert status.phase == "Deleting" and "HostPod p1, StoragePool zp" in blocked.message
