"""Cross-object admission rules and the quota ledger (pure; no apiserver)."""

from __future__ import annotations

import pytest

from controllers import admission, kinds, quota
from controllers.runtime import Store

API = "cumulo.io/v1alpha1"


def raw(kind, name, spec, namespace=None, status=None, **meta):
    metadata = {"name": name, **meta}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": API, "kind": kind, "metadata": metadata, "spec": spec, "status": status or {}}


@pytest.fixture()
def store() -> Store:
    store = Store(kinds.ALL)
    store.upsert("zones", raw("Zone", "z1", {"networkType": "Advanced", "dns1": "192.0.2.1"}))
    store.upsert("serviceofferings", raw("ServiceOffering", "small", {"cpuNumber": 2, "memoryMiB": 512,
                                                                      "rootDiskSizeGiB": 5}))
    store.upsert("serviceofferings", raw("ServiceOffering", "old", {"cpuNumber": 1, "memoryMiB": 256,
                                                                    "enabled": False}))
    store.upsert("diskofferings", raw("DiskOffering", "d10", {"diskSizeGiB": 10}))
    for namespace, public in (("tenant-a", False), ("other", False), ("library", True)):
        store.upsert("templates", raw("Template", "img", {"url": "file:///img.qcow2", "format": "QCOW2",
                                                           "public": public}, namespace=namespace))
    store.upsert("networkofferings", raw("NetworkOffering", "iso", {"guestIpType": "Isolated"}))
    store.upsert("networkofferings", raw("NetworkOffering", "shared", {"guestIpType": "Shared"}))
    store.upsert("networks", raw("Network", "own", {"networkOffering": "iso", "zone": "z1"}, namespace="tenant-a"))
    store.upsert("networks", raw("Network", "private", {"networkOffering": "iso", "zone": "z1"}, namespace="other"))
    store.upsert("networks", raw("Network", "open", {"networkOffering": "shared", "zone": "z1",
                                                     "sharedWith": {"namespaces": ["tenant-a"]}}, namespace="admin"))
    store.upsert("networks", raw("Network", "closed", {"networkOffering": "shared", "zone": "z1",
                                                       "sharedWith": {"namespaces": ["tenant-b"]}}, namespace="admin"))
    return store


def vm(name="g1", namespace="tenant-a", template=None, offering="small", nics=(), **spec):
    return kinds.VIRTUALMACHINES.parse(raw("VirtualMachine", name, {
        "serviceOffering": offering, "zone": "z1", "template": template or {"name": "img"},
        "nics": [{"network": n} for n in nics], **spec}, namespace=namespace, uid=f"uid-{name}",
        creationTimestamp="2026-01-01T00:00:00Z"))


def refused(fn, *args) -> admission.Refused:
    with pytest.raises(admission.Refused) as caught:
        fn(*args)
    return caught.value


# -- references -----------------------------------------------------------------------------------


def test_own_and_public_templates_are_visible_private_ones_of_others_are_not(store):
    admission.virtual_machine(store, vm(), None)
    admission.virtual_machine(store, vm(template={"name": "img", "namespace": "library"}), None)
    error = refused(admission.virtual_machine, store, vm(template={"name": "img", "namespace": "other"}), None)
    assert error.reason == "TemplateNotVisible"
    assert str(error) == ("TemplateNotVisible: Template other/img is private to namespace other; only public templates "
                          "can be used from other namespaces")
    assert refused(admission.virtual_machine, store, vm(template={"name": "nope"}), None).reason == "TemplateNotFound"


def test_networks_own_or_shared_with_the_namespace(store):
    admission.virtual_machine(store, vm(nics=[{"name": "own"}, {"name": "open", "namespace": "admin"}]), None)
    error = refused(admission.virtual_machine, store, vm(nics=[{"name": "closed", "namespace": "admin"}]), None)
    assert (error.reason, error.message) == ("NetworkNotVisible", "Network admin/closed is not shared with namespace "
                                                                  "tenant-a")
    # An isolated network of another namespace is never visible, whatever it says.
    assert refused(admission.virtual_machine, store, vm(nics=[{"name": "private", "namespace": "other"}]),
                   None).reason == "NetworkNotVisible"


def test_offerings_and_zone(store):
    assert refused(admission.virtual_machine, store, vm(offering="huge"), None).reason == "ServiceOfferingNotFound"
    assert refused(admission.virtual_machine, store, vm(offering="old"), None).reason == "ServiceOfferingDisabled"
    other_zone = kinds.VIRTUALMACHINES.parse(raw("VirtualMachine", "g", {
        "serviceOffering": "small", "zone": "z9", "template": {"name": "img"}}, namespace="tenant-a"))
    assert refused(admission.virtual_machine, store, other_zone, None).reason == "ZoneNotFound"
    volume = kinds.VOLUMES.parse(raw("Volume", "v", {"type": "DATADISK", "zone": "z1", "diskOffering": "nope"},
                                     namespace="tenant-a"))
    assert refused(admission.volume, store, volume, None).reason == "DiskOfferingNotFound"


def test_an_update_is_checked_only_for_what_it_changes(store):
    old = vm()
    store.remove("templates", raw("Template", "img", {}, namespace="tenant-a"))
    admission.virtual_machine(store, vm(), old)  # the template went since; a label write must still pass
    assert refused(admission.virtual_machine, store, vm(offering="old"), old).reason == "ServiceOfferingDisabled"


def test_public_ip_needs_an_isolated_network_of_its_namespace(store):
    def ip(network):
        return kinds.PUBLICIPADDRESSES.parse(raw("PublicIPAddress", "ip", {"zone": "z1", "network": network},
                                                 namespace="tenant-a"))
    admission.public_ip(store, ip("own"), None)
    assert refused(admission.public_ip, store, ip("private"), None).reason == "NetworkNotFound"
    store.upsert("networks", raw("Network", "mine-shared", {"networkOffering": "shared", "zone": "z1"},
                                 namespace="tenant-a"))
    assert refused(admission.public_ip, store, ip("mine-shared"), None).reason == "NetworkNotIsolated"


def test_rules_reference_addresses_of_their_own_namespace(store):
    rule = kinds.FIREWALLRULES.parse(raw("FirewallRule", "fw", {"publicIpAddress": "ip"}, namespace="tenant-a"))
    error = refused(admission.firewall_rule, store, rule, None)
    assert error.reason == "PublicIPAddressNotFound" and "tenant-a/ip" in error.message
    store.upsert("publicipaddresses", raw("PublicIPAddress", "ip", {"zone": "z1", "network": "own"},
                                          namespace="tenant-a"))
    admission.firewall_rule(store, rule, None)


# -- charges and the quota check -----------------------------------------------------------------


def test_a_guest_charges_its_offering_and_root_disk_its_root_volume_nothing(store):
    assert admission.charge(store, "virtualmachines", vm()) == {
        "virtualMachines": 1, "cpus": 2, "memoryMiB": 512, "volumes": 1, "primaryStorageGiB": 5}
    root = kinds.VOLUMES.parse(raw("Volume", "g1-root", {"type": "ROOT", "zone": "z1",
                                                         "virtualMachine": {"name": "g1"}}, namespace="tenant-a"))
    assert admission.charge(store, "volumes", root) == {}
    data = kinds.VOLUMES.parse(raw("Volume", "d", {"type": "DATADISK", "zone": "z1", "diskOffering": "d10"},
                                   namespace="tenant-a"))
    assert admission.charge(store, "volumes", data) == {"volumes": 1, "primaryStorageGiB": 10}


def test_quota_refusal_names_the_numbers(store):
    ledger = quota.QuotaLedger()
    limits = {"cpus": 5}
    admission.check_quota(ledger, store, "virtualmachines", vm("a"), None, limits, now=0)
    admission.check_quota(ledger, store, "virtualmachines", vm("b"), None, limits, now=0)
    error = refused(admission.check_quota, ledger, store, "virtualmachines", vm("c"), None, limits, 0)
    assert str(error) == "QuotaExceeded: namespace tenant-a: cpus 4 + 2 > limit 5"
    # A dry run checks but reserves nothing.
    assert refused(admission.check_quota, ledger, store, "virtualmachines", vm("c"), None, limits, 0,
                   True).reason == "QuotaExceeded"
    assert ledger.used("tenant-a")["cpus"] == 4


def test_a_resize_is_checked_by_its_growth(store):
    store.upsert("serviceofferings", raw("ServiceOffering", "big", {"cpuNumber": 4, "memoryMiB": 512}))
    ledger = quota.QuotaLedger()
    admission.check_quota(ledger, store, "virtualmachines", vm("a"), None, {"cpus": 3}, now=0)
    error = refused(admission.check_quota, ledger, store, "virtualmachines", vm("a", offering="big"), vm("a"),
                    {"cpus": 3}, 0)
    assert str(error) == "QuotaExceeded: namespace tenant-a: cpus 2 + 2 > limit 3"
    # Within the limit the larger charge is reserved until the store shows the resized guest.
    admission.check_quota(ledger, store, "virtualmachines", vm("a", offering="big"), vm("a"), {"cpus": 4}, now=0)
    assert ledger.used("tenant-a")["cpus"] == 4


# -- the ledger --------------------------------------------------------------------------------------


def observed(name, cpus=1, order="", holds=False):
    return quota.Observed(f"VirtualMachine/{name}", {"virtualMachines": 1, "cpus": cpus}, (order or name, name),
                          holds)


def test_concurrent_admissions_see_each_other_exactly_the_limit_fits():
    ledger = quota.QuotaLedger()
    results = [ledger.admit("ns", f"VirtualMachine/g{i}", {"virtualMachines": 1}, ("", str(i)), 0.0,
                            {"virtualMachines": 10}) for i in range(20)]
    assert sum(r is None for r in results) == 10
    assert results[10].message == "namespace ns: virtualMachines 10 + 1 > limit 10"


def test_reservations_lapse_unless_the_store_confirms_them():
    ledger = quota.QuotaLedger()
    limits = {"virtualMachines": 2}
    assert ledger.admit("ns", "VirtualMachine/a", {"virtualMachines": 1}, ("", "a"), 0.0, limits) is None
    assert ledger.admit("ns", "VirtualMachine/b", {"virtualMachines": 1}, ("", "b"), 0.0, limits) is None
    ledger.sync("ns", [observed("a")], limits, now=1.0)  # a arrived; b's create is still in flight
    assert ledger.used("ns")["virtualMachines"] == 2
    ledger.sync("ns", [observed("a")], limits, now=quota.PENDING_SECONDS + 1)  # b's create never happened
    assert ledger.used("ns")["virtualMachines"] == 1
    assert ledger.admitted("ns", "VirtualMachine/a")


def test_objects_past_the_webhook_wait_in_arrival_order_and_placed_ones_always_count():
    ledger = quota.QuotaLedger()
    limits = {"cpus": 3}
    objects = [observed("new1", order="2"), observed("new2", order="3"), observed("placed", cpus=2, order="9",
                                                                                  holds=True)]
    admitted = ledger.sync("ns", objects, limits, now=0)
    # The placed guest counts first (rebuild after a restart); of the rest, only the oldest fits.
    assert admitted == ["VirtualMachine/placed", "VirtualMachine/new1"]
    assert ledger.waiting("ns") == ["VirtualMachine/new2"]
    assert ledger.why_waiting("ns", "VirtualMachine/new2") == "cpus 3 + 1 > limit 3"
    # Room appears: the waiting guest is admitted.
    assert ledger.sync("ns", objects[1:], limits, now=1) == ["VirtualMachine/new2"]
    assert ledger.waiting("ns") == []


def test_admission_is_sticky_when_limits_are_lowered():
    ledger = quota.QuotaLedger()
    ledger.sync("ns", [observed("a"), observed("b")], {"cpus": 5}, now=0)
    ledger.sync("ns", [observed("a"), observed("b")], {"cpus": 1}, now=1)
    assert ledger.waiting("ns") == []
    assert quota.excess({}, ledger.used("ns"), ledger.limits("ns")) == ["cpus 0 + 2 > limit 1"]


def test_a_confirmed_reservation_goes_with_its_object():
    ledger = quota.QuotaLedger()
    limits = {"virtualMachines": 1}
    assert ledger.admit("ns", "VirtualMachine/a", {"virtualMachines": 1, "cpus": 1}, ("", "a"), 0.0, limits) is None
    ledger.sync("ns", [observed("a")], limits, now=1.0)
    ledger.sync("ns", [], limits, now=2.0)  # deleted, long before the reservation would lapse
    assert ledger.used("ns") == {}
    assert ledger.admit("ns", "VirtualMachine/b", {"virtualMachines": 1}, ("", "b"), 3.0, limits) is None


def test_the_charts_configuration_covers_the_same_kinds_as_the_controllers():
    import pathlib
    import re

    from controllers import webhook

    text = (pathlib.Path(__file__).resolve().parents[2] / "charts/cumulo/templates/webhook.yaml").read_text()
    listed = re.search(r"resources: \[([^\]]*)\]", text).group(1)
    assert sorted(r.strip() for r in listed.split(",")) == sorted(admission.RULES)
    generated = webhook.configuration({"url": "https://127.0.0.1:1/cumulo"})["webhooks"][0]
    assert generated["failurePolicy"] == "Ignore" and f"failurePolicy: {{{{ .Values.webhook.failurePolicy" in text
    assert generated["name"] in text and webhook.OPT_OUT_LABEL in text
