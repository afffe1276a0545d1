"""The host agent with the simulator driver: fault injection, restarts, and 200 hosts in one process."""

from __future__ import annotations

import json
import time

import pytest
from kubernetes import client

pytest.register_assert_rewrite("conftest_libvirt")
from conftest_libvirt import Cloud, audit_writes, unique, wait_for  # noqa: E402

from controllers.api.v1alpha1.common import SYSTEM_NAMESPACE  # noqa: E402
from controllers.api.v1alpha1.host import HEARTBEAT_LABEL, SIMULATOR_FAULTS_ANNOTATION  # noqa: E402

from privateplane import private_plane_fixtures  # noqa: E402

pytest_plugins = ["conftest_libvirt"]
# These tests write what the controller owns (a Host's status.zone); the session controller would take it back.
control_plane, kube, system_namespace = private_plane_fixtures()


def set_faults(cloud: Cloud, host: str, faults: dict | None) -> None:
    value = json.dumps(faults) if faults is not None else None
    cloud.patch("hosts", host, {"metadata": {"annotations": {SIMULATOR_FAULTS_ANNOTATION: value}}})


def test_simulator_fault_injection_surfaces_and_clears(system_namespace, cloud: Cloud, agents) -> None:
    host, cluster = unique("sim"), unique("cl")
    agent = agents.start(host, "--host", host, "--hypervisor", "simulator", "--register-cluster", cluster,
                         "--sim-cpus", "24", "--sim-memory-mib", "131072", "--heartbeat-interval", "1",
                         "--lease-duration", "10")
    node = wait_for(lambda: cloud.node(host), what="status.node of the auto-registered host")
    assert cloud.get("hosts", host)["spec"]["cluster"] == cluster
    assert node["hypervisorType"] == "Simulator" and node["hypervisorHealthy"] is True
    assert node["cpuCores"] == 24 and node["memoryMiB"] == 131072

    # A facts failure: the host reports an unhealthy hypervisor with the fault's message …
    set_faults(cloud, host, {"facts": {"fail": True, "message": "simulated: libvirtd not responding"}})
    node = wait_for(lambda: (n := cloud.node(host)) and n["hypervisorHealthy"] is False and n, timeout=5,
                    what="hypervisorHealthy false")
    assert node["message"] == "simulated: libvirtd not responding"
    assert node["cpuCores"] == 24  # last known facts are kept
    # … and is healthy again once the annotation is gone.
    set_faults(cloud, host, None)
    node = wait_for(lambda: (n := cloud.node(host)) and n["hypervisorHealthy"] and n, timeout=5,
                    what="hypervisorHealthy true again")
    assert node["message"] == ""

    # `times`: fail twice, then behave, without touching the annotation again.
    set_faults(cloud, host, {"facts": {"fail": True, "message": "flaky", "times": 2}})
    wait_for(lambda: cloud.node(host)["message"] == "flaky", timeout=5, what="the flaky failure")
    wait_for(lambda: cloud.node(host)["hypervisorHealthy"], timeout=5, what="recovery after 2 failures")

    # A heartbeat fault stops the Lease renewals (the host monitor then sees it Disconnected).
    set_faults(cloud, host, {"heartbeat": {"fail": True}})
    time.sleep(1.5)  # let a renewal already under way finish
    stopped_at = cloud.lease(host).spec.renew_time
    time.sleep(3)
    assert cloud.lease(host).spec.renew_time == stopped_at
    set_faults(cloud, host, None)
    wait_for(lambda: cloud.lease(host).spec.renew_time > stopped_at, timeout=5, what="renewals resuming")

    # A broken annotation is reported in the log and injects nothing.
    cloud.patch("hosts", host, {"metadata": {"annotations": {SIMULATOR_FAULTS_ANNOTATION: "{not json"}}})
    wait_for(lambda: any(record.get("msg", "").startswith("invalid cumulo.io/simulator-faults")
                         for record in agent.log_records()), timeout=5, what="the invalid annotation logged")
    assert cloud.node(host)["hypervisorHealthy"] is True
    assert agent.alive()


def test_storage_fault_and_command_line_faults(system_namespace, cloud: Cloud, agents) -> None:
    base, cluster, zone = unique("simf"), unique("cl"), unique("zone")
    pool = unique("pool")
    cloud.create("storagepools", pool, {"zone": zone, "scope": "Zone", "type": "SharedMountPoint",
                                        "path": "/simulated/pool"})
    agents.start(base, "--host", base, "--hypervisor", "simulator", "--simulate", "2", "--register-cluster", cluster,
                 "--heartbeat-interval", "1", "--lease-duration", "10",
                 "--fault", 'storage={"fail": true, "message": "simulated NFS timeout"}')
    hosts = [f"{base}-0", f"{base}-1"]
    wait_for(lambda: all(cloud.node(host) for host in hosts), what="both hosts reporting")
    for host in hosts:
        cloud.patch_status("hosts", host, {"zone": zone})
    for host in hosts:
        report = wait_for(lambda: (cloud.node(host)["storagePools"]).get(pool), timeout=5, what="pool report")
        assert report == {"reachable": False, "message": "simulated NFS timeout"}
    # The annotation overrides the command line for its host only.
    set_faults(cloud, hosts[1], {"storage": {}})
    wait_for(lambda: cloud.node(hosts[1])["storagePools"][pool]["reachable"], timeout=5, what="override")
    assert cloud.node(hosts[1])["storagePools"][pool]["capacityBytes"] == 10240 * 1024**3
    assert cloud.node(hosts[0])["storagePools"][pool]["reachable"] is False


def test_registration_from_the_node_label_or_by_the_admin(system_namespace, cloud: Cloud, agents, kube) -> None:
    core = client.CoreV1Api(kube)
    node, cluster = unique("node"), unique("cl")
    core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=node, labels={"cumulo.io/cluster": cluster})))
    try:
        labelled, unlabelled = unique("simn"), unique("simn")
        common = ["--hypervisor", "simulator", "--heartbeat-interval", "1", "--lease-duration", "10"]
        agents.start(labelled, "--host", labelled, "--node-name", node, *common)
        waiting = agents.start(unlabelled, "--host", unlabelled, "--node-name", unique("no-such-node"), *common)
        spec = wait_for(lambda: cloud.get("hosts", labelled)["spec"], what="the Host registered from the Node label")
        assert spec["cluster"] == cluster and spec["nodeName"] == node
        wait_for(lambda: cloud.node(labelled), what="its status.node")

        # No cluster to register in: the agent waits for the admin, without heartbeats meanwhile.
        wait_for(lambda: any(record["msg"].startswith("Host object does not exist")
                             for record in waiting.log_records()), what="the agent saying it waits for its Host")
        assert cloud.lease(unlabelled) is None
        cloud.create("hosts", unlabelled, {"cluster": cluster})
        wait_for(lambda: cloud.node(unlabelled) and cloud.lease(unlabelled), timeout=5,
                 what="status.node and Lease once the admin created the Host")
    finally:
        core.delete_node(node)


def test_agent_restart_reuses_lease_and_host(control_plane, system_namespace, cloud: Cloud, agents, kube) -> None:
    base, cluster = unique("simr"), unique("cl")
    args = ["--host", base, "--hypervisor", "simulator", "--simulate", "3", "--register-cluster", cluster,
            "--heartbeat-interval", "1", "--lease-duration", "10"]
    hosts = [f"{base}-{index}" for index in range(3)]
    kubeconfig, user = agents.kubeconfig(base, simulate=True)
    first = agents.start(f"{base}-first", *args, kubeconfig=kubeconfig, user=user)
    wait_for(lambda: all(cloud.node(host) and cloud.lease(host) for host in hosts), what="hosts and leases")
    host_uids = {host: cloud.get("hosts", host)["metadata"]["uid"] for host in hosts}
    lease_uids = {host: cloud.lease(host).metadata.uid for host in hosts}

    first.kill()  # SIGKILL: no goodbye
    killed_at = max(cloud.lease(host).spec.renew_time for host in hosts)
    time.sleep(2)
    assert all(cloud.lease(host).spec.renew_time <= killed_at for host in hosts)

    restarted_at = time.time()
    second = agents.start(f"{base}-second", *args, kubeconfig=kubeconfig, user=user)
    wait_for(lambda: all(cloud.lease(host).spec.renew_time > killed_at for host in hosts), timeout=10,
             what="renewals after the restart")
    time.sleep(1.5)
    assert {host: cloud.lease(host).metadata.uid for host in hosts} == lease_uids
    assert {host: cloud.get("hosts", host)["metadata"]["uid"] for host in hosts} == host_uids
    assert len([h for h in cloud.list("hosts") if h["metadata"]["name"].startswith(f"{base}-")]) == 3
    leases = client.CoordinationV1Api(kube).list_namespaced_lease(
        SYSTEM_NAMESPACE, label_selector=f"{HEARTBEAT_LABEL} in ({','.join(hosts)})").items
    assert sorted(lease.metadata.name for lease in leases) == sorted(f"host-{host}" for host in hosts)
    # Nothing changed on the hosts, so the restarted agent re-registers nothing and re-reports
    # nothing: its only writes are Lease renewals.
    writes = audit_writes(control_plane, user, restarted_at)
    assert set(writes) == {"leases"}, writes
    assert second.alive()


def test_200_simulated_hosts_in_one_process(control_plane, system_namespace, cloud: Cloud, agents, kube,
                                            record_property) -> None:
    count, interval = 200, 2
    base, cluster = unique("scale"), unique("cl")
    hosts = {f"{base}-{index}" for index in range(count)}
    started = time.monotonic()
    agent = agents.start(base, "--host", base, "--hypervisor", "simulator", "--simulate", str(count),
                         "--register-cluster", cluster, "--heartbeat-interval", str(interval))
    coordination = client.CoordinationV1Api(kube)

    def all_up() -> bool:
        reported = {h["metadata"]["name"] for h in cloud.list("hosts")
                    if h["metadata"]["name"] in hosts and (h.get("status") or {}).get("node")}
        leased = {lease.metadata.labels.get(HEARTBEAT_LABEL) for lease in coordination.list_namespaced_lease(
            SYSTEM_NAMESPACE, label_selector=HEARTBEAT_LABEL).items}
        return reported == hosts and hosts <= leased

    wait_for(all_up, timeout=120, interval=0.5, what=f"{count} hosts with status.node and a Lease")
    took = time.monotonic() - started
    rss = agent.rss_mib()

    # Steady state: about one write per host per heartbeat interval (the Lease), no status writes.
    time.sleep(interval)  # past the first, randomly phased renewals
    since = time.time()
    window = 4 * interval
    time.sleep(window)
    writes = audit_writes(control_plane, agent.user, since, since + window)
    per_host_interval = sum(writes.values()) / count / (window / interval)
    print(f"\n{count} simulated hosts: registered, reported and heartbeating in {took:.1f}s; "
          f"agent RSS {rss:.0f} MiB; steady-state writes {writes} in {window}s = "
          f"{per_host_interval:.2f} per host per {interval}s interval")
    record_property("registration_seconds", round(took, 1))
    record_property("agent_rss_mib", round(rss))
    record_property("writes_per_host_per_interval", round(per_host_interval, 2))
    assert took < 120
    assert writes.get("hosts/status", 0) == 0, writes
    assert 0.8 <= per_host_interval <= 1.2, writes
    assert agent.alive()


AGENT_RULES = [
    # What cumulo-agent needs, and nothing else (the Helm chart's agent ClusterRole mirrors this).
    {"apiGroups": ["cumulo.io"], "resources": ["hosts"], "verbs": ["get", "list", "watch", "create"]},
    {"apiGroups": ["cumulo.io"], "resources": ["hosts/status"], "verbs": ["patch"]},
    {"apiGroups": ["cumulo.io"], "resources": ["storagepools", "imagestores"], "verbs": ["list", "watch"]},
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "patch"]},
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
]


def test_least_privilege_agent_and_a_kind_it_cannot_list(control_plane, system_namespace, cloud: Cloud, agents,
                                                         kube) -> None:
    """With only the rules above (PhysicalNetworks left out on purpose), the agent registers, reports
    and heartbeats; the kind it cannot list is logged, not fatal."""
    rbac = client.RbacAuthorizationV1Api(kube)
    host, role = unique("simp"), unique("cumulo-agent")
    user = f"cumulo-agent-{host}"
    rbac.create_cluster_role({"metadata": {"name": role}, "rules": AGENT_RULES})
    rbac.create_cluster_role_binding({
        "metadata": {"name": role}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                                "name": role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]})
    try:
        kubeconfig = control_plane.mint_kubeconfig(user, [])
        agent = agents.start(host, "--host", host, "--hypervisor", "simulator", "--register-cluster", unique("cl"),
                             "--heartbeat-interval", "1", "--lease-duration", "10", kubeconfig=kubeconfig, user=user)
        wait_for(lambda: cloud.node(host) and cloud.lease(host), what="report and Lease with least privilege")
        records = agent.log_records()
        assert any(r["msg"].startswith("starting before these kinds could be listed") and
                   r["kinds"] == ["PhysicalNetwork"] for r in records), records
        assert any(r["msg"] == "list/watch failed; retrying with backoff" and r["kind"] == "PhysicalNetwork"
                   and "403" in r["error"] for r in records)

        writes = audit_writes(control_plane, user, 0)
        assert set(writes) <= {"hosts", "hosts/status", "leases"}, writes
    finally:
        rbac.delete_cluster_role_binding(role)
        rbac.delete_cluster_role(role)
