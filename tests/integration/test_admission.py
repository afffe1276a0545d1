"""The admission webhook through the real apiserver: refusals name their rule, quotas are refused with
the numbers and hold under concurrency (twenty parallel creates against a limit of ten: exactly ten
exist), and a Quota's status.used follows the namespace."""

from __future__ import annotations

import concurrent.futures
import json
import time
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

pytest.register_assert_rewrite("conftest_libvirt")
from conftest_libvirt import unique, wait_for  # noqa: E402

pytest_plugins = ["conftest_libvirt"]
pytestmark = [pytest.mark.usefixtures("controller"), pytest.mark.timeout(180)]
GROUP, VERSION = "cumulo.io", "v1alpha1"


def body(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec}


def refusal(error: ApiException) -> str:
    return json.loads(error.body).get("message", "")


@pytest.fixture
def world(kube, control_plane):
    """A zone, an offering (2 vCPUs, 512 MiB, 1 GiB root) and templates: a tenant's own, another
    namespace's private one and a public one. No hosts: the guests here are never placed."""
    custom = client.CustomObjectsApi(kube)
    zone, offering = unique("zone"), unique("small")
    custom.create_cluster_custom_object(GROUP, VERSION, "zones", body("Zone", zone, {
        "networkType": "Advanced", "dns1": "192.0.2.53"}))
    custom.create_cluster_custom_object(GROUP, VERSION, "serviceofferings", body("ServiceOffering", offering, {
        "cpuNumber": 2, "memoryMiB": 512, "rootDiskSizeGiB": 1}))
    tenant, other = unique("tenant"), unique("other")
    for namespace in (tenant, other):
        control_plane.kubectl("create", "namespace", namespace)
    for namespace, public in ((tenant, False), (other, False)):
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "templates", body("Template", "img", {
            "url": "file:///images/img.qcow2", "public": public}))
    custom.create_namespaced_custom_object(GROUP, VERSION, other, "templates", body("Template", "pub", {
        "url": "file:///images/pub.qcow2", "public": True}))
    return {"custom": custom, "zone": zone, "offering": offering, "tenant": tenant, "other": other}


def create_vm(world, name: str, namespace: str | None = None, **spec: Any) -> None:
    world["custom"].create_namespaced_custom_object(GROUP, VERSION, namespace or world["tenant"], "virtualmachines",
                                                    body("VirtualMachine", name, {
                                                        "serviceOffering": world["offering"], "zone": world["zone"],
                                                        "template": {"name": "img"}, **spec}))


def vm_names(world, namespace: str | None = None) -> set[str]:
    items = world["custom"].list_namespaced_custom_object(GROUP, VERSION, namespace or world["tenant"],
                                                          "virtualmachines")["items"]
    return {item["metadata"]["name"] for item in items}


def test_a_refused_create_names_the_rule(world):
    with pytest.raises(ApiException) as caught:
        create_vm(world, "borrower", template={"name": "img", "namespace": world["other"]})
    assert caught.value.status == 422
    assert (f"TemplateNotVisible: Template {world['other']}/img is private to namespace {world['other']}; only "
            "public templates can be used from other namespaces") in refusal(caught.value)
    with pytest.raises(ApiException) as caught:
        create_vm(world, "no-offering", serviceOffering="does-not-exist")
    assert "ServiceOfferingNotFound: ServiceOffering does-not-exist does not exist" in refusal(caught.value)
    # A public template of another namespace is fine; nothing refused was left behind.
    create_vm(world, "public", template={"name": "pub", "namespace": world["other"]})
    assert vm_names(world) == {"public"}


def test_a_network_not_shared_with_the_namespace_is_refused(world):
    custom, zone = world["custom"], world["zone"]
    isolated, shared = unique("iso"), unique("shared")
    custom.create_cluster_custom_object(GROUP, VERSION, "networkofferings", body("NetworkOffering", isolated, {
        "guestIpType": "Isolated"}))
    custom.create_cluster_custom_object(GROUP, VERSION, "networkofferings", body("NetworkOffering", shared, {
        "guestIpType": "Shared"}))
    custom.create_namespaced_custom_object(GROUP, VERSION, world["other"], "networks", body("Network", "private", {
        "networkOffering": isolated, "zone": zone}))
    custom.create_namespaced_custom_object(GROUP, VERSION, world["other"], "networks", body("Network", "open", {
        "networkOffering": shared, "zone": zone, "cidr": "10.77.0.0/24", "gateway": "10.77.0.1",
        "sharedWith": {"namespaces": [world["tenant"]]}}))
    with pytest.raises(ApiException) as caught:
        create_vm(world, "sneaky", nics=[{"network": {"name": "private", "namespace": world["other"]}}])
    assert (f"NetworkNotVisible: Network {world['other']}/private is not shared with namespace "
            f"{world['tenant']}") in refusal(caught.value)
    create_vm(world, "welcome", nics=[{"network": {"name": "open", "namespace": world["other"]}}])
    # A public IP address serves an isolated network of its own namespace only.
    with pytest.raises(ApiException) as caught:
        custom.create_namespaced_custom_object(GROUP, VERSION, world["tenant"], "publicipaddresses", body(
            "PublicIPAddress", "ip", {"zone": zone, "network": "private"}))
    assert f"NetworkNotFound: Network {world['tenant']}/private does not exist" in refusal(caught.value)


def test_quota_refuses_with_the_numbers_and_reports_use(world):
    custom, tenant = world["custom"], world["tenant"]
    custom.create_namespaced_custom_object(GROUP, VERSION, tenant, "quotas", body("Quota", "default", {
        "limits": {"cpus": 5, "virtualMachines": 10}}))
    wait_for(lambda: (custom.get_namespaced_custom_object(GROUP, VERSION, tenant, "quotas", "default")
                      .get("status") or {}).get("used") is not None, timeout=20, what="Quota status")
    create_vm(world, "a")
    create_vm(world, "b")
    with pytest.raises(ApiException) as caught:
        create_vm(world, "c")
    assert caught.value.status == 403
    assert f"QuotaExceeded: namespace {tenant}: cpus 4 + 2 > limit 5" in refusal(caught.value)
    used = wait_for(lambda: ((custom.get_namespaced_custom_object(GROUP, VERSION, tenant, "quotas", "default")
                              .get("status") or {}).get("used") or {}).get("virtualMachines") == 2 and
                    custom.get_namespaced_custom_object(GROUP, VERSION, tenant, "quotas", "default")["status"]["used"],
                    timeout=20, what="status.used")
    assert used["cpus"] == 4 and used["memoryMiB"] == 1024 and used["volumes"] == 2
    # Deleting a guest frees its share.
    custom.delete_namespaced_custom_object(GROUP, VERSION, tenant, "virtualmachines", "a")
    wait_for(lambda: "a" not in vm_names(world), timeout=30, what="guest a gone")
    create_vm(world, "c")


def test_twenty_concurrent_creates_against_a_limit_of_ten(world, kube):
    custom, tenant = world["custom"], world["tenant"]
    custom.create_namespaced_custom_object(GROUP, VERSION, tenant, "quotas", body("Quota", "default", {
        "limits": {"virtualMachines": 10}}))
    wait_for(lambda: (custom.get_namespaced_custom_object(GROUP, VERSION, tenant, "quotas", "default")
                      .get("status") or {}).get("used") is not None, timeout=20, what="Quota status")

    def create(index: int) -> str:
        # One client per thread: the requests really are concurrent at the apiserver.
        with client.ApiClient(kube.configuration) as own:
            try:
                client.CustomObjectsApi(own).create_namespaced_custom_object(
                    GROUP, VERSION, tenant, "virtualmachines", body("VirtualMachine", f"g{index:02d}", {
                        "serviceOffering": world["offering"], "zone": world["zone"], "template": {"name": "img"}}))
                return "created"
            except ApiException as error:
                return refusal(error)

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(create, range(20)))
    elapsed = time.monotonic() - started
    assert results.count("created") == 10, results
    refused = [r for r in results if r != "created"]
    assert all(f"QuotaExceeded: namespace {tenant}: virtualMachines 10 + 1 > limit 10" in r for r in refused), refused
    assert len(vm_names(world)) == 10
    # Nothing left behind, and every admitted guest is admitted by the controller's ledger too.
    time.sleep(1)
    assert len(vm_names(world)) == 10
    for name in vm_names(world):
        vm = custom.get_namespaced_custom_object(GROUP, VERSION, tenant, "virtualmachines", name)
        reasons = [c.get("reason") for c in (vm.get("status") or {}).get("conditions", [])]
        assert "QuotaExceeded" not in reasons, vm
    print(f"20 concurrent creates through the webhook in {elapsed:.2f}s")


def test_guests_past_the_webhook_wait_for_quota_in_the_controller(world, kube, control_plane):
    """The second line: in a namespace the webhook skips, the controller's ledger holds the guest that
    does not fit (condition QuotaExceeded with the numbers, not placed) and admits it once room appears."""
    custom = world["custom"]
    namespace = unique("nowebhook")
    control_plane.kubectl("create", "namespace", namespace)
    control_plane.kubectl("label", "namespace", namespace, "cumulo.io/admission-webhook=disabled")
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "templates", body("Template", "img", {
        "url": "file:///images/img.qcow2"}))
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "quotas", body("Quota", "default", {
        "limits": {"virtualMachines": 1}}))
    wait_for(lambda: (custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "quotas", "default")
                      .get("status") or {}).get("used") is not None, timeout=20, what="Quota status")
    create_vm(world, "first", namespace)
    time.sleep(0.5)
    create_vm(world, "second", namespace)  # not refused: the webhook skips this namespace

    def ready(name: str) -> dict:
        vm = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "virtualmachines", name)
        return next((c for c in (vm.get("status") or {}).get("conditions", []) if c["type"] == "Ready"), {})

    held = wait_for(lambda: ready("second").get("reason") == "QuotaExceeded" and ready("second"), timeout=20,
                    what="second guest held")
    assert "virtualMachines 1 + 1 > limit 1" in held["message"]
    assert ready("first").get("reason") != "QuotaExceeded"
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "virtualmachines", "first")
    wait_for(lambda: ready("second").get("reason") not in (None, "QuotaExceeded"), timeout=30,
             what="second guest admitted")
