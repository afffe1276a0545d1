"""The agent's VirtualRouter reconciler against an in-memory API and a fake router runtime: what it reports in
status.node, when it writes, and which routers the sweep tears down (only those the API confirms unneeded)."""

from __future__ import annotations

import asyncio
import typing as t

from test_agent_reconcilers import apply_status, make_agent

from hostagent.kube import KubeError
from hostagent.router.runtime import Applied, Owner, RouterError
from hostagent.routers import RouterReconciler

NET_A, NET_B, NET_C = ("aaaaaaaa-0000-4000-8000-000000000001", "bbbbbbbb-0000-4000-8000-000000000002",
                       "cccccccc-0000-4000-8000-000000000003")
LIST_PATH = "/apis/cumulo.io/v1alpha1/virtualrouters"


class FakeRuntime:
    def __init__(self) -> None:
        self.applied: list[tuple[str, int | None]] = []
        self.failure: str | None = None
        self.warnings: tuple[str, ...] = ()
        self.namespace_names: list[str] = []
        self.owner_records: list[tuple[str, Owner | None]] = []
        self.torn_down: list[str] = []

    def netns(self, network_uid: str) -> str:
        return f"cumulo-vr-{network_uid[:8]}"

    def paths(self, network_uid: str) -> str:
        return network_uid

    def dnsmasq_pid(self, netns: str, paths: t.Any) -> int | None:
        return 4242 if self.applied else None

    async def apply(self, spec: t.Any, **owner: t.Any) -> Applied:
        if self.failure:
            raise RouterError(self.failure)
        self.applied.append((spec.network_uid, None))
        return Applied(self.netns(spec.network_uid), 4242, self.warnings, ["nftables"])

    def namespaces(self) -> list[str]:
        return list(self.namespace_names)

    def owners(self) -> list[tuple[str, Owner | None]]:
        return list(self.owner_records)

    async def teardown(self, network_uid: str, owner: Owner | None, network: t.Any) -> None:
        self.torn_down.append(network_uid)


def router_object(network_uid: str = NET_A, name: str = "net1", host: str = "h1", spec_host: str | None = None,
                  generation: int = 1) -> dict:
    return {
        "metadata": {"name": name, "namespace": "ns", "uid": f"vr-{name}", "generation": generation,
                     "labels": {"cumulo.io/host": host}},
        "spec": {"network": name, "networkUid": network_uid, "host": spec_host or host,
                 "guest": {"segment": {"trafficLabel": "cloudbr0", "bridge": "cloudbr0"},
                           "macAddress": "02:00:0a:01:01:01", "addresses": ["10.1.1.1/24"]}},
    }


def setup(tmp_path, **config: t.Any) -> tuple[t.Any, RouterReconciler, FakeRuntime]:
    agent = make_agent(tmp_path)
    for key, value in config.items():
        setattr(agent.config, key, value)
    reconciler = RouterReconciler(agent)
    runtime = FakeRuntime()
    reconciler.runtime = runtime  # type: ignore[assignment]
    return agent, reconciler, runtime


async def round_(reconciler: RouterReconciler, obj: dict) -> float | None:
    key = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
    reconciler.informer.cache[key] = obj
    before = len(reconciler.agent.api.patches())
    delay = await reconciler.reconcile(key, obj)
    for patch in reconciler.agent.api.patches()[before:]:
        apply_status(obj, patch)
    return delay


def test_running_is_reported_once_with_the_applied_generation(tmp_path):
    async def main() -> None:
        agent, reconciler, runtime = setup(tmp_path)
        obj = router_object()
        assert await round_(reconciler, obj) is None
        node = obj["status"]["node"]
        assert node["state"] == "Running" and node["host"] == "h1" and node["namespace"] == "cumulo-vr-aaaaaaaa"
        assert node["appliedGeneration"] == 1 and node["dnsmasqPid"] == 4242 and node["reportedAt"]
        assert node["message"] == ""
        for _ in range(3):  # level-based: applied again, nothing new to say, nothing written
            await round_(reconciler, obj)
        assert len(agent.api.patches()) == 1 and len(runtime.applied) == 4
        obj["metadata"]["generation"] = 2
        runtime.warnings = ("load balancer lb: LeastConn cannot be done by stateless nftables NAT; using RoundRobin",)
        await round_(reconciler, obj)
        assert obj["status"]["node"]["appliedGeneration"] == 2
        assert "LeastConn" in obj["status"]["node"]["message"]
    asyncio.run(main())


def test_an_error_keeps_the_last_applied_generation(tmp_path):
    async def main() -> None:
        _, reconciler, runtime = setup(tmp_path)
        obj = router_object()
        await round_(reconciler, obj)
        obj["metadata"]["generation"] = 2
        runtime.failure = "nft -f failed (exit 1): Error: syntax error"
        delay = await round_(reconciler, obj)
        node = obj["status"]["node"]
        assert delay and delay > 0
        assert node["state"] == "Error" and node["message"] == runtime.failure and node["appliedGeneration"] == 1
        runtime.failure = None
        assert await round_(reconciler, obj) is None
        assert obj["status"]["node"]["state"] == "Running" and obj["status"]["node"]["appliedGeneration"] == 2
    asyncio.run(main())


def test_an_unreadable_spec_is_an_error_not_a_crash(tmp_path):
    async def main() -> None:
        _, reconciler, runtime = setup(tmp_path)
        obj = router_object()
        del obj["spec"]["guest"]
        assert await round_(reconciler, obj) is None
        assert obj["status"]["node"]["state"] == "Error" and "spec cannot be read" in obj["status"]["node"]["message"]
        assert runtime.applied == []
    asyncio.run(main())


def test_a_router_being_moved_is_left_to_the_sweep(tmp_path):
    async def main() -> None:
        agent, reconciler, runtime = setup(tmp_path)
        obj = router_object(spec_host="h2")  # labelled h1, configured for h2: the controller is moving it
        await round_(reconciler, obj)
        assert runtime.applied == [] and agent.api.patches() == []
    asyncio.run(main())


def test_simulated_hosts_report_routers_without_building_them(tmp_path):
    async def main() -> None:
        _, reconciler, runtime = setup(tmp_path, network_driver="simulator")
        reconciler.simulated = True
        obj = router_object()
        await round_(reconciler, obj)
        assert runtime.applied == [] and obj["status"]["node"]["state"] == "Running"
        runtime.namespace_names = ["cumulo-vr-bbbbbbbb"]
        await reconciler.sweep()
        assert runtime.torn_down == []
    asyncio.run(main())


def test_the_sweep_tears_down_only_what_the_api_confirms_unneeded(tmp_path):
    async def main() -> None:
        agent, reconciler, runtime = setup(tmp_path)
        reconciler.informer.cache["ns/net1"] = router_object(NET_A)
        owner_b = Owner(namespace="ns", name="old", uid="vr-old", host="h1", network_uid=NET_B,
                        netns="cumulo-vr-bbbbbbbb", host_netns=None)
        runtime.namespace_names = ["cumulo-vr-aaaaaaaa", "cumulo-vr-bbbbbbbb", "cumulo-vr-cccccccc",
                                   "cumulo-vr-dddddddd"]
        runtime.owner_records = [(NET_A, None), (NET_B, owner_b)]
        # The API cannot answer: nothing is destroyed on the cache's word.
        agent.api.objects[LIST_PATH] = KubeError(None, "Unavailable", "connection refused")
        await reconciler.sweep()
        assert runtime.torn_down == []
        # C is in the API but not yet in the cache (a lagging watch): kept. D is bound to another host: removed.
        agent.api.objects[LIST_PATH] = {"items": [router_object(NET_A), router_object(NET_C, name="net3"),
                                                  router_object("dddddddd-x", name="net4", host="h9")]}
        await reconciler.sweep()
        assert sorted(runtime.torn_down) == [NET_B, "dddddddd"]
    asyncio.run(main())
