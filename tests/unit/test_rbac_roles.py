"""The shipped ClusterRoles cover every kind of controllers/api exactly as intended.

Every kind is put in one class below; a kind added to the API without being classified here (and granted in
charts/cumulo/templates/tenant-roles.yaml) fails this test, so nobody forgets to decide who may touch it.
The rules are evaluated the way RBAC does (group, resource, verb, with '*' wildcards), so the test checks what
the YAML grants, not how it is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from controllers.api.crd import registry

REPO = Path(__file__).resolve().parents[2]
TENANT_ROLES = REPO / "charts" / "cumulo" / "templates" / "tenant-roles.yaml"
AGENT_RESTRICTION = REPO / "charts" / "cumulo" / "templates" / "agent-restriction.yaml"

TENANT = {"VirtualMachine", "Volume", "Snapshot", "Template", "Network", "PublicIPAddress", "FirewallRule",
          "PortForwardingRule", "LoadBalancerRule", "SecurityGroup", "AffinityGroup"}
"""Namespaced kinds a namespace's editors manage."""
TENANT_READ_ONLY = {"Quota", "VirtualRouter", "UsageRecord", "VirtualMachineMigration"}
"""Namespaced kinds tenants see but others write (the cloud admin: Quota and VirtualMachineMigration, as
CloudStack's migrateVirtualMachine is an admin call; the controller: VirtualRouter, UsageRecord)."""
CATALOG = {"Zone", "ServiceOffering", "DiskOffering", "NetworkOffering"}
"""Cluster-scoped, admin-written, readable by every authenticated user."""
INFRASTRUCTURE = {"HostPod", "Cluster", "Host", "StoragePool", "ImageStore", "PhysicalNetwork"}
"""Cloud admins only."""

READ = {"get", "list", "watch"}
WRITE = {"create", "update", "patch", "delete", "deletecollection"}
ALL = READ | WRITE


def kinds() -> dict[str, tuple[str, bool]]:
    """kind -> (plural, namespaced) of every kind of the API."""
    result = {}
    for crd in registry():
        manifest = crd.kubernetes_resource()
        result[crd.kind] = (crd.plural_name, manifest["spec"]["scope"] == "Namespaced")
    return result


def documents(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in yaml.safe_load_all(path.read_text()) if doc}


def granted(role: dict[str, Any], resource: str, group: str = "cumulo.io") -> set[str]:
    verbs: set[str] = set()
    for rule in role.get("rules") or []:
        if (group in rule.get("apiGroups", []) or "*" in rule.get("apiGroups", [])) and \
                (resource in rule.get("resources", []) or "*" in rule.get("resources", [])):
            verbs |= ALL if "*" in rule["verbs"] else set(rule["verbs"])
    return verbs


ROLES = documents(TENANT_ROLES)
CLUSTER_ROLES = {name: doc for (kind, name), doc in ROLES.items() if kind == "ClusterRole"}


def test_every_kind_is_classified_once() -> None:
    classes = [TENANT, TENANT_READ_ONLY, CATALOG, INFRASTRUCTURE]
    every = kinds()
    unclassified = set(every) - set().union(*classes)
    assert not unclassified, f"decide who may use {sorted(unclassified)}: classify it here and grant it in " \
                             f"{TENANT_ROLES.relative_to(REPO)}"
    assert sum(len(group) for group in classes) == len(set().union(*classes)), "a kind is in two classes"
    assert set().union(*classes) <= set(every), "a classified kind no longer exists"
    for kind in TENANT | TENANT_READ_ONLY:
        assert every[kind][1], f"{kind} is a tenant kind but cluster-scoped: a RoleBinding could not grant it"


# What each role grants on each class of kinds (main resource; status separately below).
EXPECTED = {
    "cumulo-admin": {"tenant": ALL, "tenant-read-only": ALL, "catalog": ALL, "infrastructure": ALL},
    "cumulo-tenant-admin": {"tenant": ALL, "tenant-read-only": READ, "catalog": set(), "infrastructure": set()},
    "cumulo-tenant-user": {"tenant": ALL, "tenant-read-only": READ, "catalog": set(), "infrastructure": set()},
    "cumulo-view": {"tenant": READ, "tenant-read-only": READ, "catalog": set(), "infrastructure": set()},
    "cumulo-tenant-catalog": {"tenant": set(), "tenant-read-only": set(), "catalog": READ, "infrastructure": set()},
    "cumulo-shared-reader": {"tenant": set(), "tenant-read-only": set(), "catalog": set(), "infrastructure": set()},
}


def class_of(kind: str) -> str:
    return ("tenant" if kind in TENANT else "tenant-read-only" if kind in TENANT_READ_ONLY
            else "catalog" if kind in CATALOG else "infrastructure")


@pytest.mark.parametrize("role", sorted(EXPECTED))
def test_role_grants_exactly_the_intended_verbs(role: str) -> None:
    rules = CLUSTER_ROLES[role]
    wrong = {}
    for kind, (plural, _) in sorted(kinds().items()):
        expected = EXPECTED[role][class_of(kind)]
        if role == "cumulo-shared-reader" and kind in ("Template", "Network"):
            expected = READ  # the public catalog namespace: templates and shared networks
        if granted(rules, plural) != expected:
            wrong[kind] = sorted(granted(rules, plural))
    assert not wrong, f"{role} grants {wrong}"


def test_status_is_written_only_by_cloud_admins() -> None:
    for name, role in CLUSTER_ROLES.items():
        for kind, (plural, _) in kinds().items():
            verbs = granted(role, f"{plural}/status")
            if name == "cumulo-admin":
                assert verbs == {"get", "update", "patch"}, (kind, verbs)
            else:
                assert not verbs & WRITE, f"{name} may write {plural}/status"


def test_no_wildcards_and_only_the_cumulo_group() -> None:
    for name, role in CLUSTER_ROLES.items():
        for rule in role["rules"]:
            assert rule["apiGroups"] == ["cumulo.io"], (name, rule)
            assert "*" not in rule["resources"] and "*" not in rule["verbs"], (name, rule)


def test_aggregation_into_the_kubernetes_roles() -> None:
    def aggregated_into(role: str) -> set[str]:
        labels = CLUSTER_ROLES[role]["metadata"].get("labels") or {}
        prefix = "rbac.authorization.k8s.io/aggregate-to-"
        return {key[len(prefix):] for key, value in labels.items() if key.startswith(prefix) and value == "true"}

    assert aggregated_into("cumulo-tenant-admin") == {"admin"}
    assert aggregated_into("cumulo-tenant-user") == {"edit"}
    assert aggregated_into("cumulo-view") == {"view"}
    for role in ("cumulo-admin", "cumulo-tenant-catalog", "cumulo-shared-reader"):
        assert aggregated_into(role) == set(), role


def test_catalog_and_shared_namespace_are_readable_by_every_authenticated_user() -> None:
    everyone = [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:authenticated"}]
    binding = ROLES[("ClusterRoleBinding", "cumulo-tenant-catalog")]
    assert binding["roleRef"]["name"] == "cumulo-tenant-catalog" and binding["subjects"] == everyone
    binding = ROLES[("RoleBinding", "cumulo-shared-reader")]
    assert binding["metadata"]["namespace"] == "cumulo-shared"
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": "cumulo-shared-reader"}
    assert binding["subjects"] == everyone


def test_agent_role_writes_only_status_of_its_kinds_hosts_and_leases() -> None:
    """The agent's RBAC is the verbs it calls; which objects is the admission policy's job (integration)."""
    docs = documents(AGENT_RESTRICTION)
    role = docs[("ClusterRole", "cumulo-agent")]
    writes = {}
    for kind, (plural, _) in kinds().items():
        for resource in (plural, f"{plural}/status"):
            verbs = granted(role, resource) & WRITE
            if verbs:
                writes[resource] = verbs
    assert writes == {"hosts": {"create"}, "hosts/status": {"patch"}, "virtualmachines/status": {"patch"},
                      "volumes/status": {"patch"}, "templates/status": {"patch"}, "virtualrouters/status": {"patch"},
                      "virtualmachinemigrations/status": {"patch"}, "snapshots/status": {"patch"}}
    assert granted(role, "leases", "coordination.k8s.io") == {"create", "patch"}
    assert granted(role, "nodes", "") == {"get"}
    # User data Secrets are read by name when a guest starts; never listed or watched (no bulk reads of Secrets).
    assert granted(role, "secrets", "") == {"get"}
    assert {group for rule in role["rules"] for group in rule["apiGroups"]} == {"cumulo.io", "coordination.k8s.io", ""}
    policy = docs[("ValidatingAdmissionPolicy", "cumulo-agent-node-restriction")]
    binding = docs[("ValidatingAdmissionPolicyBinding", "cumulo-agent-node-restriction")]
    assert binding["spec"] == {"policyName": "cumulo-agent-node-restriction", "validationActions": ["Deny"]}
    assert policy["spec"]["failurePolicy"] == "Fail"
    # Each refusal names its rule.
    for validation in policy["spec"]["validations"]:
        assert validation["messageExpression"].startswith("'cumulo-agent-node-restriction ("), validation


def test_example_namespace_follows_the_domain_label_convention() -> None:
    from controllers.api.v1alpha1.common import ACCOUNT_TYPE_LABEL, DOMAIN_LABEL, DOMAIN_LEVEL_PREFIX

    docs = documents(REPO / "examples" / "basic-zone" / "00-namespace.yaml")
    labels = docs[("Namespace", "tenant-a")]["metadata"]["labels"]
    parts = labels[DOMAIN_LABEL].split(".")
    assert parts[0] == "ROOT"
    ancestors = {key for key in labels if key.startswith(DOMAIN_LEVEL_PREFIX)}
    assert ancestors == {DOMAIN_LEVEL_PREFIX + ".".join(parts[:depth]) for depth in range(1, len(parts) + 1)}
    assert labels[ACCOUNT_TYPE_LABEL] in ("account", "project")
