"""Node restriction for host agents: an agent's credentials write only what is bound to its own host.

The shipped RBAC and ValidatingAdmissionPolicy (charts/cumulo/templates/agent-restriction.yaml) in the real
apiserver, exercised with the identities the launcher mints: a client certificate per host, a simulator
identity for ``--simulate N``, and the production one — the DaemonSet's ServiceAccount with a Pod-bound token,
whose host is the node name the apiserver puts into the token.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controllers.api.v1alpha1.common import SYSTEM_NAMESPACE
from controllers.api.v1alpha1.host import HEARTBEAT_LABEL, HOST_LABEL
from cumulo import envtest
from privateplane import private_plane_fixtures
from security import POLICY, install_security, mint_agent_kubeconfig

# A control plane of this module's own: its guests are labelled for hosts by hand, which the session's
# controller (and its admission webhook) would undo or refuse.
control_plane, kube, system_namespace = private_plane_fixtures()

G, V = "cumulo.io", "v1alpha1"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def refusal(call: Callable[[], Any]) -> str:
    """The apiserver's message refusing ``call`` (fails if it was allowed)."""
    with pytest.raises(ApiException) as caught:
        call()
    assert caught.value.status == 403, caught.value.body
    return str(json.loads(caught.value.body)["message"])


def host_body(name: str) -> dict[str, Any]:
    return {"apiVersion": f"{G}/{V}", "kind": "Host", "metadata": {"name": name}, "spec": {"cluster": "restricted"}}


def lease_body(name: str, host: str, holder: str | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {HEARTBEAT_LABEL: host, HOST_LABEL: host}},
            "spec": {"holderIdentity": holder or host, "leaseDurationSeconds": 40}}


class World:
    """Two hosts, a tenant namespace with a guest and a volume on each host, made by the admin."""

    def __init__(self, plane: envtest.ControlPlane, kube: client.ApiClient) -> None:
        install_security(plane)
        plane.kubectl("create", "namespace", SYSTEM_NAMESPACE, check=False)
        self.plane = plane
        self.admin = client.CustomObjectsApi(kube)
        self.host1, self.host2 = unique("rh1"), unique("rh2")
        self.namespace = unique("tenant")
        client.CoreV1Api(kube).create_namespace({"metadata": {"name": self.namespace}})
        for host in (self.host1, self.host2):
            self.admin.create_cluster_custom_object(G, V, "hosts", host_body(host))
        self.vms = {}
        for host in (self.host1, self.host2, None):
            name = unique("vm")
            labels = {HOST_LABEL: host} if host else {}
            self.admin.create_namespaced_custom_object(G, V, self.namespace, "virtualmachines", {
                "apiVersion": f"{G}/{V}", "kind": "VirtualMachine", "metadata": {"name": name, "labels": labels},
                "spec": {"serviceOffering": "small", "template": {"name": "tiny"}, "zone": "z1", "state": "Stopped"}})
            self.vms[host] = name
        self.volume = unique("vol")
        self.admin.create_namespaced_custom_object(G, V, self.namespace, "volumes", {
            "apiVersion": f"{G}/{V}", "kind": "Volume", "metadata": {"name": self.volume,
                                                                    "labels": {HOST_LABEL: self.host2}},
            "spec": {"type": "DATADISK", "sizeGiB": 1, "zone": "z1"}})


@pytest.fixture(scope="module")
def world(control_plane: envtest.ControlPlane, kube: client.ApiClient) -> World:
    return World(control_plane, kube)


@pytest.fixture(scope="module")
def agent1(world: World) -> Iterator[client.ApiClient]:
    kubeconfig, _ = mint_agent_kubeconfig(world.plane, world.host1)
    with world.plane.api_client(kubeconfig) as api:
        yield api


def test_agent_writes_its_own_host_lease_and_guests(world: World, agent1: client.ApiClient) -> None:
    custom, leases = client.CustomObjectsApi(agent1), client.CoordinationV1Api(agent1)
    node = {"status": {"node": {"message": "reported by its agent"}}}
    assert custom.patch_cluster_custom_object_status(G, V, "hosts", world.host1, node)["status"]["node"]["message"]
    lease = f"host-{world.host1}"
    leases.create_namespaced_lease(SYSTEM_NAMESPACE, lease_body(lease, world.host1))
    leases.patch_namespaced_lease(lease, SYSTEM_NAMESPACE, {"spec": {"renewTime": "2030-01-01T00:00:00.000000Z"}})
    patched = custom.patch_namespaced_custom_object_status(G, V, world.namespace, "virtualmachines",
                                                           world.vms[world.host1], node)
    assert patched["status"]["node"]["message"] == "reported by its agent"


def test_agent_cannot_write_another_hosts_objects(world: World, agent1: client.ApiClient) -> None:
    custom, leases = client.CustomObjectsApi(agent1), client.CoordinationV1Api(agent1)
    node = {"status": {"node": {"message": "forged"}}}
    own_host = f"{POLICY} (own-host): system:cumulo-agent:{world.host1} acts for host {world.host1}, not for"

    message = refusal(lambda: custom.patch_cluster_custom_object_status(G, V, "hosts", world.host2, node))
    assert f"{own_host} hosts/status {world.host2}, which belongs to host {world.host2}" in message
    message = refusal(lambda: leases.create_namespaced_lease(SYSTEM_NAMESPACE,
                                                             lease_body(f"host-{world.host2}", world.host2)))
    assert f"{own_host} leases {SYSTEM_NAMESPACE}/host-{world.host2}" in message
    message = refusal(lambda: custom.patch_namespaced_custom_object_status(
        G, V, world.namespace, "virtualmachines", world.vms[world.host2], node))
    assert f"virtualmachines/status {world.namespace}/{world.vms[world.host2]}, which belongs to host " \
           f"{world.host2}" in message
    message = refusal(lambda: custom.patch_namespaced_custom_object_status(
        G, V, world.namespace, "volumes", world.volume, {"status": {"node": {"exists": True}}}))
    assert f"which belongs to host {world.host2}" in message
    message = refusal(lambda: custom.patch_namespaced_custom_object_status(
        G, V, world.namespace, "virtualmachines", world.vms[None], node))
    assert "which is bound to no host" in message
    # Registering somebody else's Host.
    message = refusal(lambda: custom.create_cluster_custom_object(G, V, "hosts", host_body(unique("other"))))
    assert f"{POLICY} (own-host)" in message

    # None of it happened.
    assert "node" not in (world.admin.get_cluster_custom_object(G, V, "hosts", world.host2).get("status") or {})
    vm = world.admin.get_namespaced_custom_object(G, V, world.namespace, "virtualmachines", world.vms[world.host2])
    assert "node" not in (vm.get("status") or {})


def test_agent_cannot_forge_a_heartbeat_or_the_controllers_fields(world: World, agent1: client.ApiClient) -> None:
    """Its own objects too: the Lease keeps naming its host (the host monitor trusts the label), and only
    status.node of its Host and guests is the agent's."""
    custom, leases = client.CoordinationV1Api(agent1), client.CustomObjectsApi(agent1)
    lease = f"host-{world.host1}"
    try:
        custom.create_namespaced_lease(SYSTEM_NAMESPACE, lease_body(lease, world.host1))
    except ApiException as error:
        assert error.status == 409
    message = refusal(lambda: custom.patch_namespaced_lease(lease, SYSTEM_NAMESPACE, {
        "metadata": {"labels": {HOST_LABEL: world.host2}}}))
    assert f"{POLICY} (lease-identity): heartbeat Lease {SYSTEM_NAMESPACE}/{lease} must live in cumulo-system and " \
           f"name only host {world.host1}" in message
    message = refusal(lambda: custom.patch_namespaced_lease(lease, SYSTEM_NAMESPACE, {
        "spec": {"holderIdentity": world.host2}}))
    assert "(lease-identity)" in message

    message = refusal(lambda: leases.patch_cluster_custom_object_status(G, V, "hosts", world.host1,
                                                                        {"status": {"phase": "Up"}}))
    assert f"{POLICY} (own-status-key): an agent writes only status.node of hosts/status {world.host1}" in message
    message = refusal(lambda: leases.patch_namespaced_custom_object_status(
        G, V, world.namespace, "virtualmachines", world.vms[world.host1], {"status": {"phase": "Running"}}))
    assert "(own-status-key)" in message


def test_agent_rbac_has_only_the_verbs_it_calls(world: World, agent1: client.ApiClient) -> None:
    custom = client.CustomObjectsApi(agent1)
    vm = world.vms[world.host1]
    for call in (
        lambda: custom.patch_namespaced_custom_object(G, V, world.namespace, "virtualmachines", vm,
                                                      {"spec": {"state": "Running"}}),
        lambda: custom.delete_namespaced_custom_object(G, V, world.namespace, "virtualmachines", vm),
        lambda: custom.delete_cluster_custom_object(G, V, "hosts", world.host1),
        lambda: custom.patch_cluster_custom_object(G, V, "hosts", world.host1, {"spec": {"cluster": "elsewhere"}}),
        lambda: custom.create_cluster_custom_object(G, V, "zones", {
            "apiVersion": f"{G}/{V}", "kind": "Zone", "metadata": {"name": unique("z")}, "spec": {}}),
        lambda: client.CoreV1Api(agent1).list_namespaced_secret(world.namespace),
        lambda: client.CoordinationV1Api(agent1).delete_namespaced_lease(f"host-{world.host1}", SYSTEM_NAMESPACE),
    ):
        assert f'User "system:cumulo-agent:{world.host1}" cannot' in refusal(call)
    # What it reads: every host's guests (RBAC does not filter by label) — the agent selects its own.
    listed = custom.list_namespaced_custom_object(G, V, world.namespace, "virtualmachines",
                                                  label_selector=f"{HOST_LABEL}={world.host1}")
    assert [item["metadata"]["name"] for item in listed["items"]] == [vm]


def test_agent_gets_a_secret_by_name_only(world: World, kube: client.ApiClient, agent1: client.ApiClient) -> None:
    """User data Secrets: GET by name, the known gap (any Secret it names; see agent-restriction.yaml), and no
    list, watch or write of Secrets."""
    name = unique("userdata")
    client.CoreV1Api(kube).create_namespaced_secret(world.namespace, {
        "metadata": {"name": name}, "stringData": {"userdata": "#cloud-config\n"}})
    core = client.CoreV1Api(agent1)
    assert core.read_namespaced_secret(name, world.namespace).data == {"userdata": "I2Nsb3VkLWNvbmZpZwo="}
    for call in (
        lambda: core.list_secret_for_all_namespaces(),
        lambda: core.list_namespaced_secret(world.namespace, watch=True, timeout_seconds=1),
        lambda: core.patch_namespaced_secret(name, world.namespace, {"stringData": {"userdata": "x"}}),
        lambda: core.delete_namespaced_secret(name, world.namespace),
        lambda: core.create_namespaced_secret(world.namespace, {"metadata": {"name": unique("s")}}),
    ):
        assert f'User "system:cumulo-agent:{world.host1}" cannot' in refusal(call)


def test_simulator_identity_acts_for_its_simulated_hosts_only(world: World) -> None:
    base = unique("rsim")
    for name in (f"{base}-0", f"{base}-12", f"{base}-x"):
        world.admin.create_cluster_custom_object(G, V, "hosts", host_body(name))
    kubeconfig, _ = mint_agent_kubeconfig(world.plane, base, simulator=True)
    node = {"status": {"node": {"message": "simulated"}}}
    with world.plane.api_client(kubeconfig) as api:
        custom = client.CustomObjectsApi(api)
        for name in (f"{base}-0", f"{base}-12"):
            custom.patch_cluster_custom_object_status(G, V, "hosts", name, node)
        for name in (f"{base}-x", world.host1):
            assert f"acts for host {base} (and its simulated hosts {base}-N), not for hosts/status {name}" \
                in refusal(lambda: custom.patch_cluster_custom_object_status(G, V, "hosts", name, node))
    # Without the simulator group the same name is one host only.
    kubeconfig, _ = mint_agent_kubeconfig(world.plane, base)
    with world.plane.api_client(kubeconfig) as api:
        assert "(own-host)" in refusal(lambda: client.CustomObjectsApi(api).patch_cluster_custom_object_status(
            G, V, "hosts", f"{base}-0", node))


def pod_token(world: World, kube: client.ApiClient, account: str, node: str) -> Any:
    """A kubeconfig with the Pod-bound token of a Pod of ServiceAccount ``account`` on Node ``node``."""
    core = client.CoreV1Api(kube)
    core.create_node({"metadata": {"name": node}})
    try:
        core.create_namespaced_service_account(SYSTEM_NAMESPACE, {"metadata": {"name": account}})
    except ApiException as error:
        assert error.status == 409
    pod = core.create_namespaced_pod(SYSTEM_NAMESPACE, {"metadata": {"name": unique(account)}, "spec": {
        "nodeName": node, "serviceAccountName": account, "containers": [{"name": "agent", "image": "cumulo-agent"}]}})
    return world.plane.service_account_kubeconfig(
        SYSTEM_NAMESPACE, account, world.plane.workdir / f"{node}.kubeconfig", create_namespace=False,
        bound_object_ref={"kind": "Pod", "name": pod.metadata.name, "uid": pod.metadata.uid})


def test_daemonset_service_account_acts_for_its_pods_node(world: World, kube: client.ApiClient) -> None:
    """Production: one ServiceAccount for every agent Pod; the host is the node the token's Pod runs on."""
    node = unique("node")
    world.admin.create_cluster_custom_object(G, V, "hosts", host_body(node))
    status = {"status": {"node": {"message": "from the DaemonSet"}}}
    with world.plane.api_client(pod_token(world, kube, "cumulo-agent", node)) as api:
        custom = client.CustomObjectsApi(api)
        custom.patch_cluster_custom_object_status(G, V, "hosts", node, status)
        client.CoordinationV1Api(api).create_namespaced_lease(SYSTEM_NAMESPACE, lease_body(f"host-{node}", node))
        message = refusal(lambda: custom.patch_cluster_custom_object_status(G, V, "hosts", world.host2, status))
        assert f"system:serviceaccount:{SYSTEM_NAMESPACE}:cumulo-agent acts for host {node}, not for hosts/status " \
               f"{world.host2}" in message


def test_simulator_daemonset_acts_for_its_nodes_simulated_hosts(world: World, kube: client.ApiClient) -> None:
    node = unique("simnode")
    for host in (f"{node}-0", f"{node}-1"):
        world.admin.create_cluster_custom_object(G, V, "hosts", host_body(host))
    status = {"status": {"node": {"message": "simulated in a cluster"}}}
    with world.plane.api_client(pod_token(world, kube, "cumulo-simulator", node)) as api:
        custom = client.CustomObjectsApi(api)
        custom.patch_cluster_custom_object_status(G, V, "hosts", f"{node}-1", status)
        message = refusal(lambda: custom.patch_cluster_custom_object_status(G, V, "hosts", world.host1, status))
        assert f"acts for host {node} (and its simulated hosts {node}-N)" in message
