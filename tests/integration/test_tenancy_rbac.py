"""Tenancy with Kubernetes' own means: a namespace is an account, Kubernetes' admin/edit/view roles carry the
shipped Cumulo rights (charts/cumulo/templates/tenant-roles.yaml), zones and offerings are readable by every
user, public templates and shared networks sit in cumulo-shared.

The matrix, with identities the launcher mints (client certificates, no system:masters): tenant A's editor
manages A's guests, disks, networks and rules, reads A's quota and routers, the catalog and cumulo-shared, and
nothing of tenant B, nor any infrastructure kind. Each answer is checked twice: what the apiserver says it
would allow (SelfSubjectAccessReview, `kubectl auth can-i`) and what real requests get.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controllers.api.v1alpha1.common import (
    ACCOUNT_TYPE_LABEL,
    DOMAIN_LABEL,
    DOMAIN_LEVEL_PREFIX,
    SHARED_NAMESPACE,
)
from cumulo import envtest
from security import install_security

G, V = "cumulo.io", "v1alpha1"
TENANT_KINDS = ["virtualmachines", "volumes", "snapshots", "templates", "networks", "publicipaddresses",
                "firewallrules", "portforwardingrules", "loadbalancerrules", "securitygroups", "affinitygroups"]
TENANT_READ_ONLY = ["quotas", "virtualrouters"]
CATALOG = ["zones", "serviceofferings", "diskofferings", "networkofferings"]
INFRASTRUCTURE = ["hostpods", "clusters", "hosts", "storagepools", "imagestores", "physicalnetworks"]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def status_of(call: Callable[[], Any]) -> int:
    try:
        call()
    except ApiException as error:
        return int(error.status)
    return 200


@dataclass
class Tenancy:
    plane: envtest.ControlPlane
    admin: client.CustomObjectsApi
    a: str
    b: str
    zone: str
    offering: str
    public_template: str
    b_objects: dict[str, str]
    users: dict[str, client.ApiClient]
    kubeconfigs: dict[str, Path]


def namespace_labels(domain: str) -> dict[str, str]:
    """The domain labels of a namespace in ``domain`` (``ROOT.customers``), as documented in common.py."""
    parts = domain.split(".")
    labels = {DOMAIN_LABEL: domain, ACCOUNT_TYPE_LABEL: "account"}
    labels.update({DOMAIN_LEVEL_PREFIX + ".".join(parts[:depth]): "true" for depth in range(1, len(parts) + 1)})
    return labels


def template(name: str, zone: str, public: bool) -> dict[str, Any]:
    return {"apiVersion": f"{G}/{V}", "kind": "Template", "metadata": {"name": name},
            "spec": {"url": "file:///var/lib/cumulo/seed/tiny-guest.qcow2", "format": "QCOW2", "zone": zone,
                     "public": public}}


def vm(name: str, tenancy: Tenancy, template_ref: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": f"{G}/{V}", "kind": "VirtualMachine", "metadata": {"name": name},
            "spec": {"serviceOffering": tenancy.offering, "template": template_ref, "zone": tenancy.zone,
                     "state": "Stopped"}}


@pytest.fixture(scope="module")
def tenancy(control_plane: envtest.ControlPlane, kube: client.ApiClient) -> Iterator[Tenancy]:
    install_security(control_plane)
    core, rbac, admin = client.CoreV1Api(kube), client.RbacAuthorizationV1Api(kube), client.CustomObjectsApi(kube)
    a, b = unique("tenant-a"), unique("tenant-b")
    for namespace, domain in ((a, "ROOT.customers.acme"), (b, "ROOT.customers.globex")):
        core.create_namespace({"metadata": {"name": namespace, "labels": namespace_labels(domain)}})
    # B's objects are props (a network whose offering does not exist): the admission webhook is not what this
    # module tests, so B opts out of it; A's objects, made by its tenant, are valid and pass it.
    control_plane.kubectl("label", "namespace", b, "cumulo.io/admission-webhook=disabled")
    zone, offering = unique("zone"), unique("small")
    admin.create_cluster_custom_object(G, V, "zones", {"apiVersion": f"{G}/{V}", "kind": "Zone",
                                                       "metadata": {"name": zone},
                                                       "spec": {"networkType": "Advanced", "dns1": "1.1.1.1"}})
    admin.create_cluster_custom_object(G, V, "serviceofferings", {
        "apiVersion": f"{G}/{V}", "kind": "ServiceOffering", "metadata": {"name": offering},
        "spec": {"cpuNumber": 1, "cpuSpeedMHz": 1000, "memoryMiB": 128, "storageType": "local"}})
    public_template = unique("public")
    admin.create_namespaced_custom_object(G, V, SHARED_NAMESPACE, "templates", template(public_template, zone, True))
    # Tenant B's own objects, which A must not see.
    b_objects = {"templates": unique("private")}
    admin.create_namespaced_custom_object(G, V, b, "templates", template(b_objects["templates"], zone, False))
    b_objects["networks"] = unique("net")
    admin.create_namespaced_custom_object(G, V, b, "networks", {
        "apiVersion": f"{G}/{V}", "kind": "Network", "metadata": {"name": b_objects["networks"]},
        "spec": {"networkOffering": "isolated", "zone": zone, "cidr": "10.9.0.0/24", "gateway": "10.9.0.1"}})
    b_objects["volumes"] = unique("vol")
    admin.create_namespaced_custom_object(G, V, b, "volumes", {
        "apiVersion": f"{G}/{V}", "kind": "Volume", "metadata": {"name": b_objects["volumes"]},
        "spec": {"type": "DATADISK", "sizeGiB": 1, "zone": zone}})

    users: dict[str, client.ApiClient] = {}
    kubeconfigs: dict[str, Path] = {}
    for role in ("admin", "edit", "view", None):  # None: authenticated, no rights in any namespace
        user = unique(f"{role or 'nobody'}-user")
        if role is not None:
            rbac.create_namespaced_role_binding(a, {
                "metadata": {"name": user},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]})
        kubeconfigs[role or "nobody"] = control_plane.mint_kubeconfig(user, ["acme:users"])
        users[role or "nobody"] = control_plane.api_client(kubeconfigs[role or "nobody"])
    tenancy = Tenancy(control_plane, admin, a, b, zone, offering, public_template,
                      b_objects | {"virtualmachines": unique("vm")}, users, kubeconfigs)
    admin.create_namespaced_custom_object(G, V, b, "virtualmachines",
                                          vm(tenancy.b_objects["virtualmachines"], tenancy,
                                             {"name": public_template, "namespace": SHARED_NAMESPACE}))
    yield tenancy
    for api in users.values():
        api.close()


def can(api: client.ApiClient, verb: str, resource: str, namespace: str | None = None,
        subresource: str | None = None, group: str = G) -> bool:
    review = client.AuthorizationV1Api(api).create_self_subject_access_review({"spec": {"resourceAttributes": {
        "group": group, "resource": resource, "verb": verb, "namespace": namespace, "subresource": subresource}}})
    return bool(review.status.allowed)


def expected(role: str, resource: str, verb: str, namespace: str | None, tenancy: Tenancy) -> bool:
    """What the shipped roles intend, by the role bound in tenant A."""
    read = verb in ("get", "list", "watch")
    if resource in CATALOG:
        return read  # every authenticated user, cluster-wide
    if resource in INFRASTRUCTURE:
        return False
    if namespace == SHARED_NAMESPACE:
        return read and resource in ("templates", "networks")
    if namespace != tenancy.a or role == "nobody":
        return False
    if resource in TENANT_READ_ONLY or role == "view":
        return read
    return True


VERBS = ["get", "list", "watch", "create", "update", "patch", "delete"]


@pytest.mark.parametrize("role", ["edit", "admin", "view", "nobody"])
def test_access_review_matrix(tenancy: Tenancy, role: str) -> None:
    api = tenancy.users[role]
    wrong = []
    for resource in TENANT_KINDS + TENANT_READ_ONLY:
        for namespace in (tenancy.a, tenancy.b, SHARED_NAMESPACE):
            for verb in VERBS:
                if can(api, verb, resource, namespace) != expected(role, resource, verb, namespace, tenancy):
                    wrong.append((verb, resource, namespace))
            # Status is the controller's and the agents', whoever the tenant is.
            if can(api, "patch", resource, tenancy.a, "status"):
                wrong.append(("patch", f"{resource}/status", tenancy.a))
    for resource in CATALOG + INFRASTRUCTURE:
        for verb in VERBS:
            if can(api, verb, resource) != expected(role, resource, verb, None, tenancy):
                wrong.append((verb, resource, "cluster"))
    assert not wrong, f"{role} in {tenancy.a}: unexpected answers {wrong}"


def test_kubectl_auth_can_i_answers_for_a_tenant(tenancy: Tenancy) -> None:
    path = tenancy.kubeconfigs["edit"]

    def can_i(*args: str) -> str:
        return tenancy.plane.kubectl("auth", "can-i", *args, kubeconfig=path, check=False).stdout.strip()

    assert can_i("create", "virtualmachines.cumulo.io", "-n", tenancy.a) == "yes"
    assert can_i("list", "virtualmachines.cumulo.io", "-n", tenancy.b) == "no"
    assert can_i("list", "zones.cumulo.io") == "yes"
    assert can_i("create", "hosts.cumulo.io") == "no"
    assert can_i("update", "quotas.cumulo.io", "-n", tenancy.a) == "no"


def test_tenant_cannot_reach_another_tenants_objects(tenancy: Tenancy) -> None:
    custom = client.CustomObjectsApi(tenancy.users["edit"])
    b = tenancy.b
    for plural, name in tenancy.b_objects.items():
        assert status_of(lambda: custom.list_namespaced_custom_object(G, V, b, plural)) == 403, plural
        assert status_of(lambda: custom.get_namespaced_custom_object(G, V, b, plural, name)) == 403, plural
        assert status_of(lambda: custom.delete_namespaced_custom_object(G, V, b, plural, name)) == 403, plural
    assert status_of(lambda: custom.create_namespaced_custom_object(
        G, V, b, "virtualmachines", vm(unique("intruder"), tenancy, {"name": tenancy.public_template,
                                                                     "namespace": SHARED_NAMESPACE}))) == 403
    # Nor list across namespaces.
    assert status_of(lambda: custom.list_cluster_custom_object(G, V, "virtualmachines")) == 403
    assert status_of(lambda: custom.list_cluster_custom_object(G, V, "templates")) == 403


def test_tenant_manages_its_own_and_reads_the_catalog(tenancy: Tenancy) -> None:
    custom = client.CustomObjectsApi(tenancy.users["edit"])
    a = tenancy.a
    name = unique("web")
    created = custom.create_namespaced_custom_object(G, V, a, "virtualmachines", vm(
        name, tenancy, {"name": tenancy.public_template, "namespace": SHARED_NAMESPACE}))
    assert created["metadata"]["namespace"] == a
    custom.patch_namespaced_custom_object(G, V, a, "virtualmachines", name, {"spec": {"displayName": "Web 1"}})
    assert [item["metadata"]["name"] for item in custom.list_namespaced_custom_object(
        G, V, a, "virtualmachines")["items"]] == [name]
    group = unique("sg")
    custom.create_namespaced_custom_object(G, V, a, "securitygroups", {
        "apiVersion": f"{G}/{V}", "kind": "SecurityGroup", "metadata": {"name": group}, "spec": {}})
    custom.delete_namespaced_custom_object(G, V, a, "securitygroups", group)
    # The catalog: zones and offerings cluster-wide, public templates in cumulo-shared.
    assert tenancy.zone in {item["metadata"]["name"] for item in custom.list_cluster_custom_object(
        G, V, "zones")["items"]}
    assert custom.get_cluster_custom_object(G, V, "serviceofferings", tenancy.offering)["spec"]["cpuNumber"] == 1
    shared = custom.list_namespaced_custom_object(G, V, SHARED_NAMESPACE, "templates")["items"]
    assert tenancy.public_template in {item["metadata"]["name"] for item in shared}
    # ... read only.
    assert status_of(lambda: custom.create_namespaced_custom_object(
        G, V, SHARED_NAMESPACE, "templates", template(unique("mine"), tenancy.zone, True))) == 403
    assert status_of(lambda: custom.patch_cluster_custom_object(
        G, V, "serviceofferings", tenancy.offering, {"spec": {"cpuNumber": 64}})) == 403
    # Its own status and its quota are not its to write.
    assert status_of(lambda: custom.patch_namespaced_custom_object_status(
        G, V, a, "virtualmachines", name, {"status": {"phase": "Running"}})) == 403
    assert status_of(lambda: custom.create_namespaced_custom_object(G, V, a, "quotas", {
        "apiVersion": f"{G}/{V}", "kind": "Quota", "metadata": {"name": "more"}, "spec": {}})) == 403
    assert custom.list_namespaced_custom_object(G, V, a, "quotas")["items"] == []


def test_tenant_cannot_create_infrastructure(tenancy: Tenancy) -> None:
    custom = client.CustomObjectsApi(tenancy.users["admin"])  # even the namespace's admin
    bodies = {
        "zones": {"networkType": "Advanced"},
        "hostpods": {"zone": tenancy.zone, "cidr": "10.100.0.0/24", "gateway": "10.100.0.1"},
        "clusters": {"zone": tenancy.zone, "pod": "p"},
        "hosts": {"cluster": "c"},
        "storagepools": {"zone": tenancy.zone},
        "imagestores": {"zone": tenancy.zone},
        "physicalnetworks": {"zone": tenancy.zone},
        "serviceofferings": {"cpuNumber": 1, "cpuSpeedMHz": 1000, "memoryMiB": 128},
        "diskofferings": {},
        "networkofferings": {},
    }
    kinds = {"zones": "Zone", "hostpods": "HostPod", "clusters": "Cluster", "hosts": "Host",
             "storagepools": "StoragePool", "imagestores": "ImageStore", "physicalnetworks": "PhysicalNetwork",
             "serviceofferings": "ServiceOffering", "diskofferings": "DiskOffering",
             "networkofferings": "NetworkOffering"}
    for plural, spec in bodies.items():
        body = {"apiVersion": f"{G}/{V}", "kind": kinds[plural], "metadata": {"name": unique("x")}, "spec": spec}
        assert status_of(lambda: custom.create_cluster_custom_object(G, V, plural, body)) == 403, plural
    for plural in INFRASTRUCTURE:
        assert status_of(lambda: custom.list_cluster_custom_object(G, V, plural)) == 403, plural


def test_domain_labels_select_a_subtree(tenancy: Tenancy, kube: client.ApiClient) -> None:
    core = client.CoreV1Api(kube)
    subtree = {ns.metadata.name for ns in core.list_namespace(
        label_selector=f"{DOMAIN_LEVEL_PREFIX}ROOT.customers").items}
    assert {tenancy.a, tenancy.b} <= subtree
    acme = {ns.metadata.name for ns in core.list_namespace(label_selector=f"{DOMAIN_LABEL}=ROOT.customers.acme").items}
    assert tenancy.a in acme and tenancy.b not in acme
