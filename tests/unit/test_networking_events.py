"""Events on transitions for the networking kinds: every phase or Ready-reason change of a Network, VirtualRouter,
PublicIPAddress and rule is announced (base.InventoryReconciler.announce), with the new reason and a message."""

from __future__ import annotations

import asyncio

from fakeapi import FakeApi
from test_network_reconciler import network_world, router_runs, vm_on
from test_vm_reconciler import agent_downloads, obj, settle, start


class RecordingApi(FakeApi):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str, str, str, str]] = []

    async def record_event(self, kind, obj, type_, reason, note):
        self.events.append((kind.kind, obj.metadata.name, type_, reason, note))
        await super().record_event(kind, obj, type_, reason, note)


def test_networking_kinds_announce_their_transitions():
    async def scenario():
        api = RecordingApi()
        network_world(api)
        runtime = await start(api)
        agent_downloads(api)
        api.put("virtualmachines", vm_on("web1"))
        api.put("publicipaddresses", obj("PublicIPAddress", "ip-web", {"zone": "z1", "network": "net1"},
                                         namespace="demo"))
        api.put("firewallrules", obj("FirewallRule", "allow-ssh", {
            "publicIpAddress": "ip-web", "protocol": "TCP", "ports": {"start": 22, "end": 22},
            "cidrs": ["198.51.100.0/24"]}, namespace="demo"))
        api.put("portforwardingrules", obj("PortForwardingRule", "ssh", {
            "publicIpAddress": "ip-web", "publicPorts": {"start": 2222, "end": 2222},
            "privatePorts": {"start": 22, "end": 22}, "virtualMachine": {"name": "web1"}}, namespace="demo"))
        api.put("loadbalancerrules", obj("LoadBalancerRule", "web", {
            "publicIpAddress": "ip-web", "publicPort": 80, "privatePort": 80, "members": [{"name": "web1"}]},
            namespace="demo"))
        await settle(runtime)
        router_runs(api)
        await settle(runtime)
        await runtime.stop()
        return api.events

    events = asyncio.run(scenario())

    def reasons(kind: str, name: str) -> list[str]:
        return [reason for k, n, _, reason, _ in events if (k, n) == (kind, name)]

    # Each kind: a Warning while it waits, then a Normal event once Ready, each with a message.
    assert "Running" in reasons("VirtualRouter", "net1"), events
    network = [(reason, note) for k, n, _, reason, note in events if (k, n) == ("Network", "net1")]
    assert "StartingRouter" in [reason for reason, _ in network], events
    assert network[-1][1].startswith("Implemented: "), events
    assert reasons("PublicIPAddress", "ip-web"), events
    for kind, name in (("FirewallRule", "allow-ssh"), ("PortForwardingRule", "ssh"), ("LoadBalancerRule", "web")):
        assert reasons(kind, name)[-1] == "Applied", (kind, events)
        assert "NetworkNotImplemented" in reasons(kind, name), (kind, events)
    assert all(note for *_, note in events)
    assert {type_ for k, _, type_, reason, _ in events if reason in ("Applied", "Running")} == {"Normal"}
