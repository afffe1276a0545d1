"""The Network reconciler in memory: implement on first start, router configuration, shutdown after the last
stop with addresses kept, static addresses, exhaustion, rules folded into the router."""

from __future__ import annotations

import asyncio

from controllers.api.v1alpha1.host import HOST_LABEL

from fakeapi import FakeApi
from test_vm_reconciler import add_hosts, agent_creates_disk, agent_downloads, conditions, obj, settle, start, world

ISOLATED_SERVICES = [{"name": n} for n in ("Dhcp", "Dns", "SourceNat", "StaticNat", "PortForwarding", "Firewall",
                                            "Lb")]


def network_world(api: FakeApi, cidr: str | None = None, hosts=("h1",)) -> None:
    world(api, hosts=())
    add_hosts(api, hosts, cpus=64, memory=65536)
    for host in hosts:
        raw = api.get("hosts", host)
        raw["status"]["node"]["bridges"] = {"cloudbr0": True, "cloudbr1": True}
        api.put("hosts", raw)
    api.put("physicalnetworks", obj("PhysicalNetwork", "pnet1", {
        "zone": "z1", "isolationMethod": "VXLAN", "vnetRanges": [{"start": 5000, "end": 5001}],
        "trafficTypes": [{"type": "Guest", "label": "cloudbr0"}, {"type": "Public", "label": "cloudbr1"}],
        "publicIpRanges": [{"cidr": "203.0.113.0/24", "gateway": "203.0.113.1", "startIp": "203.0.113.10",
                            "endIp": "203.0.113.20"}], "mtu": 1600}))
    api.put("networkofferings", obj("NetworkOffering", "isolated", {"guestIpType": "Isolated",
                                                                    "services": ISOLATED_SERVICES}))
    spec = {"networkOffering": "isolated", "zone": "z1"}
    if cidr:
        spec.update(cidr=cidr, gateway=cidr.rsplit(".", 1)[0] + ".1")
    api.put("networks", obj("Network", "net1", spec, namespace="demo"))


def vm_on(name: str, **nic) -> dict:
    return obj("VirtualMachine", name, {"serviceOffering": "small", "template": {"name": "tiny"}, "zone": "z1",
                                        "nics": [{"network": {"name": "net1"}, **nic}]}, namespace="demo")


def router_runs(api: FakeApi) -> None:
    router = api.get("virtualrouters", "net1", "demo")
    router.setdefault("status", {})["node"] = {"host": router["spec"]["host"], "state": "Running", "namespace": "cumulo-vr-x",
                                "appliedGeneration": router["metadata"]["generation"]}
    api.put("virtualrouters", router)


def test_first_start_implements_last_stop_shuts_down_and_the_next_start_keeps_addresses():
    async def scenario():
        api = FakeApi()
        network_world(api)
        runtime = await start(api)
        agent_downloads(api)
        await settle(runtime)
        net = api.get("networks", "net1", "demo")
        assert net["status"]["phase"] == "Allocated" and net["status"]["cidr"] == "10.1.1.0/24"
        assert net["status"]["gateway"] == "10.1.1.1"

        api.put("virtualmachines", vm_on("vm1"))
        await settle(runtime)
        vm = api.get("virtualmachines", "vm1", "demo")
        nic = vm["status"]["nics"][0]
        assert nic["network"] == "demo/net1" and nic["ipAddress"] == "10.1.1.2" and nic["macAddress"].startswith("02:")
        net = api.get("networks", "net1", "demo")
        assert net["status"]["phase"] == "Implementing" and net["status"]["broadcastUri"] == "vxlan://5000"
        snat = api.get("publicipaddresses", "net1-source-nat", "demo")
        assert snat["status"]["ipAddress"] == "203.0.113.10"
        router = api.get("virtualrouters", "net1", "demo")
        assert router["metadata"]["labels"][HOST_LABEL] == "h1"
        spec = router["spec"]
        assert spec["guest"]["segment"]["bridge"] == "brvx-5000" and spec["guest"]["segment"]["mtu"] == 1550
        assert spec["guest"]["addresses"] == ["10.1.1.1/24"] and spec["sourceNatIp"] == "203.0.113.10"
        assert spec["public"]["addresses"] == ["203.0.113.10/24"] and spec["publicGateway"] == "203.0.113.1"
        assert spec["leases"] == [{"macAddress": nic["macAddress"], "ipAddress": "10.1.1.2", "hostname": "vm1",
                                   "default": True}]
        assert conditions(vm)["NetworkReady"]["reason"] == "NetworkImplementing"

        router_runs(api)
        agent_creates_disk(api, "vm1-root")
        await settle(runtime)
        net = api.get("networks", "net1", "demo")
        assert net["status"]["phase"] == "Implemented" and net["status"]["router"]["host"] == "h1"
        launch_nic = api.get("virtualmachines", "vm1", "demo")["status"]["launch"]["nics"][0]
        assert launch_nic["bridge"] == "brvx-5000" and launch_nic["ipAddress"] == "10.1.1.2"
        assert launch_nic["broadcastUri"] == "vxlan://5000" and launch_nic["default"] is True

        vm = api.get("virtualmachines", "vm1", "demo")
        vm["spec"]["state"] = "Stopped"
        api.put("virtualmachines", vm)
        await settle(runtime)
        net = api.get("networks", "net1", "demo")
        assert net["status"]["phase"] == "Shutdown" and "broadcastUri" not in net["status"]
        assert api.get("virtualrouters", "net1", "demo") is None
        assert runtime.reconcilers["networks"].vnets["pnet1"].used == 0
        assert api.get("virtualmachines", "vm1", "demo")["status"]["nics"][0]["ipAddress"] == "10.1.1.2"

        vm = api.get("virtualmachines", "vm1", "demo")
        vm["spec"]["state"] = "Running"
        api.put("virtualmachines", vm)
        await settle(runtime)
        router_runs(api)
        await settle(runtime)
        net = api.get("networks", "net1", "demo")
        assert net["status"]["phase"] == "Implemented" and net["status"]["gateway"] == "10.1.1.1"
        vm = api.get("virtualmachines", "vm1", "demo")
        assert vm["status"]["nics"][0]["ipAddress"] == "10.1.1.2" and vm["status"]["launch"]["nics"][0][
            "macAddress"] == nic["macAddress"]
        await runtime.stop()

    asyncio.run(scenario())


def test_static_addresses_are_honoured_or_refused_and_exhaustion_is_a_condition():
    async def scenario():
        api = FakeApi()
        network_world(api, cidr="10.9.0.0/29")  # .2-.6 for guests
        runtime = await start(api)
        agent_downloads(api)
        await settle(runtime)
        api.put("virtualmachines", vm_on("fixed", ipAddress="10.9.0.5"))
        api.put("virtualmachines", vm_on("clash", ipAddress="10.9.0.5"))
        for index in range(5):
            api.put("virtualmachines", vm_on(f"vm{index}"))
        await settle(runtime)
        vms = {name: api.get("virtualmachines", name, "demo") for name in
               ["fixed", "clash", *(f"vm{i}" for i in range(5))]}
        assert vms["fixed"]["status"]["nics"][0]["ipAddress"] == "10.9.0.5"
        clash = conditions(vms["clash"])["NetworkReady"]
        assert clash["status"] == "False" and clash["reason"] == "IpAddressInUse" and "fixed" in clash["message"]
        given = [v["status"]["nics"][0].get("ipAddress") for v in vms.values()]
        assert sorted(a for a in given if a) == ["10.9.0.2", "10.9.0.3", "10.9.0.4", "10.9.0.5", "10.9.0.6"]
        starved = [n for n, v in vms.items() if conditions(v).get("NetworkReady", {}).get("reason") ==
                   "InsufficientAddressCapacity"]
        assert len(starved) == 1, starved
        assert "no address on network demo/net1" in conditions(vms[starved[0]])["Ready"]["message"]
        net = api.get("networks", "net1", "demo")
        assert net["status"]["ipsTotal"] == 5 and net["status"]["ipsAllocated"] == 5

        fixed = api.get("virtualmachines", "fixed", "demo")
        fixed["spec"]["nics"] = []  # taking the NIC out gives its address back
        api.put("virtualmachines", fixed)
        await settle(runtime)
        assert api.get("virtualmachines", "fixed", "demo")["status"]["nics"] == []
        # the freed address goes to one of the waiting guests
        waiting = [api.get("virtualmachines", n, "demo") for n in ("clash", *starved)]
        assert sum(1 for v in waiting if v["status"]["nics"][0].get("ipAddress")) == 1
        await runtime.stop()

    asyncio.run(scenario())


def test_rules_are_folded_into_the_router_configuration():
    async def scenario():
        api = FakeApi()
        network_world(api)
        runtime = await start(api)
        agent_downloads(api)
        api.put("virtualmachines", vm_on("web1"))
        api.put("virtualmachines", vm_on("web2"))
        api.put("publicipaddresses", obj("PublicIPAddress", "ip-web", {"zone": "z1", "network": "net1"},
                                         namespace="demo"))
        api.put("publicipaddresses", obj("PublicIPAddress", "ip-nat", {"zone": "z1", "network": "net1",
                                                                       "staticNat": {"virtualMachine": {
                                                                           "name": "web2"}}}, namespace="demo"))
        api.put("portforwardingrules", obj("PortForwardingRule", "ssh", {
            "publicIpAddress": "ip-web", "publicPorts": {"start": 2222, "end": 2222},
            "privatePorts": {"start": 22, "end": 22}, "virtualMachine": {"name": "web1"}}, namespace="demo"))
        api.put("firewallrules", obj("FirewallRule", "allow-ssh", {
            "publicIpAddress": "ip-web", "protocol": "TCP", "ports": {"start": 2222, "end": 2222},
            "cidrs": ["198.51.100.0/24"]}, namespace="demo"))
        api.put("firewallrules", obj("FirewallRule", "no-egress-dns", {
            "direction": "Egress", "network": "net1", "protocol": "UDP", "ports": {"start": 53, "end": 53}},
                                     namespace="demo"))
        api.put("loadbalancerrules", obj("LoadBalancerRule", "web", {
            "publicIpAddress": "ip-web", "publicPort": 80, "privatePort": 80, "healthCheck": {},
            "members": [{"name": "web1"}, {"name": "web2"}]}, namespace="demo"))
        await settle(runtime)
        spec = api.get("virtualrouters", "net1", "demo")["spec"]
        web = api.get("publicipaddresses", "ip-web", "demo")["status"]["ipAddress"]
        nat = api.get("publicipaddresses", "ip-nat", "demo")["status"]["ipAddress"]
        ips = {n: api.get("virtualmachines", n, "demo")["status"]["nics"][0]["ipAddress"] for n in ("web1", "web2")}
        assert sorted(spec["public"]["addresses"]) == sorted(f"{a}/24" for a in (spec["sourceNatIp"], web, nat))
        assert spec["staticNats"] == [{"publicIp": nat, "privateIp": ips["web2"]}]
        assert spec["portForwards"][0] | {} == {"name": "ssh", "publicIp": web, "protocol": "TCP",
                                                "publicPortStart": 2222, "publicPortEnd": 2222,
                                                "privateIp": ips["web1"], "privatePortStart": 22, "sourceCidrs": []}
        assert spec["firewall"] == [{"publicIp": web, "protocol": "TCP", "portStart": 2222, "portEnd": 2222,
                                     "cidrs": ["198.51.100.0/24"]}]
        assert spec["egress"] == [{"protocol": "UDP", "portStart": 53, "portEnd": 53, "cidrs": []}]
        assert spec["loadBalancers"][0]["members"] == [ips["web1"], ips["web2"]]
        lb = api.get("loadbalancerrules", "web", "demo")
        assert conditions(lb)["Ready"]["reason"] == "NetworkNotImplemented"
        assert "Implementing" in conditions(lb)["Ready"]["message"]
        router_runs(api)
        await settle(runtime)
        lb = api.get("loadbalancerrules", "web", "demo")
        assert lb["status"]["phase"] == "Applied" and conditions(lb)["Ready"]["reason"] == "Applied"
        assert "health checks are not implemented" in conditions(lb)["Limitations"]["message"]
        assert [m["ipAddress"] for m in lb["status"]["members"]] == [ips["web1"], ips["web2"]]
        await runtime.stop()

    asyncio.run(scenario())


def test_l2_networks_take_a_vni_but_no_addresses_and_shared_ones_are_visible_only_where_opened():
    async def scenario():
        api = FakeApi()
        network_world(api)
        api.put("networkofferings", obj("NetworkOffering", "l2", {"guestIpType": "L2"}))
        api.put("networkofferings", obj("NetworkOffering", "shared", {"guestIpType": "Shared",
                                                                      "services": [{"name": "Dhcp"}]}))
        api.put("networks", obj("Network", "seg", {"networkOffering": "l2", "zone": "z1"}, namespace="demo"))
        api.put("networks", obj("Network", "lan", {"networkOffering": "shared", "zone": "z1", "cidr": "10.7.0.0/24",
                                                   "gateway": "10.7.0.1", "startIp": "10.7.0.100",
                                                   "endIp": "10.7.0.200", "sharedWith": {"namespaces": ["other"]}},
                                namespace="infra"))
        runtime = await start(api)
        agent_downloads(api)
        api.put("virtualmachines", obj("VirtualMachine", "l2vm", {
            "serviceOffering": "small", "template": {"name": "tiny"}, "zone": "z1",
            "nics": [{"network": {"name": "seg"}}, {"network": {"name": "lan", "namespace": "infra"}}]},
            namespace="demo"))
        await settle(runtime)
        vm = api.get("virtualmachines", "l2vm", "demo")
        ready = conditions(vm)["NetworkReady"]
        assert ready["reason"] == "NetworkNotVisible" and "not shared with namespace demo" in ready["message"]

        lan = api.get("networks", "lan", "infra")
        lan["spec"]["sharedWith"] = {"namespaces": ["other", "demo"]}
        api.put("networks", lan)
        await settle(runtime)
        vm = api.get("virtualmachines", "l2vm", "demo")
        seg_nic, lan_nic = vm["status"]["nics"]
        assert "ipAddress" not in seg_nic and seg_nic["macAddress"].startswith("02:")
        assert lan_nic["ipAddress"] == "10.7.0.100" and lan_nic["deviceId"] == 1
        seg = api.get("networks", "seg", "demo")
        assert seg["status"]["phase"] == "Implemented" and seg["status"]["broadcastUri"] == "vxlan://5000"
        assert "router" not in seg["status"] and api.get("virtualrouters", "seg", "demo") is None
        lan = api.get("networks", "lan", "infra")
        # A shared network's router is not its gateway: it takes an address of the range.
        assert lan["status"]["router"]["guestIp"] == "10.7.0.101"
        assert "broadcastUri" not in lan["status"]  # untagged: the guest label bridge itself
        router = api.get("virtualrouters", "lan", "infra")
        assert router["spec"]["guest"]["segment"]["bridge"] == "cloudbr0" and router["spec"]["gateway"] == "10.7.0.1"
        assert "public" not in router["spec"]

        # A network in use cannot go: the deletion waits, saying for whom.
        await runtime.api.delete(runtime.store.kinds["networks"], "seg", "demo")
        await settle(runtime)
        seg = api.get("networks", "seg", "demo")
        assert seg is not None and "VirtualMachine demo/l2vm" in conditions(seg)["DeletionBlocked"]["message"]
        await runtime.stop()

    asyncio.run(scenario())


def test_security_groups_on_an_open_vswitch_network_are_refused_not_silently_skipped():
    async def scenario():
        api = FakeApi()
        network_world(api)
        pnet = api.get("physicalnetworks", "pnet1")
        pnet["spec"]["vswitch"] = "openvswitch"
        api.put("physicalnetworks", pnet)
        api.put("networkofferings", obj("NetworkOffering", "sg", {"guestIpType": "Shared", "services": [
            {"name": "SecurityGroup", "provider": "SecurityGroupProvider"}]}))
        api.put("networks", obj("Network", "flat", {"networkOffering": "sg", "zone": "z1", "cidr": "10.8.0.0/24",
                                                    "gateway": "10.8.0.1"}, namespace="demo"))
        runtime = await start(api)
        agent_downloads(api)
        api.put("virtualmachines", obj("VirtualMachine", "vm1", {
            "serviceOffering": "small", "template": {"name": "tiny"}, "zone": "z1",
            "nics": [{"network": {"name": "flat"}}]}, namespace="demo"))
        await settle(runtime)
        agent_creates_disk(api, "vm1-root")
        await settle(runtime)
        vm = api.get("virtualmachines", "vm1", "demo")
        ready = conditions(vm)["NetworkReady"]
        assert ready["reason"] == "SecurityGroupsNotSupported" and "openvswitch" in ready["message"]
        assert "launch" not in vm["status"]
        await runtime.stop()

    asyncio.run(scenario())
