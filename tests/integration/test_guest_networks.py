"""Guest networks end to end: the controller implements networks and writes routers, agents on hosts simulated as
network namespaces plumb VXLAN segments, run the virtual routers (dnsmasq + nftables) and netns guests. Everything
on the wire is real: DHCP, DNS, VXLAN between hosts, NAT, firewall, load balancing, security groups."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

pytest.register_assert_rewrite("conftest_libvirt", "networkcloud")
from conftest_libvirt import wait_for  # noqa: E402
from networkcloud import ISOLATED_SERVICES, PUBLIC_GATEWAY, NetworkCloud, http, tcp  # noqa: E402

from cumulo import ovs  # noqa: E402
from cumulo.netlab import list_netns  # noqa: E402

pytest_plugins = ["conftest_libvirt", "conftest_netlab"]
pytestmark = [pytest.mark.usefixtures("controller", "system_namespace"), pytest.mark.timeout(300)]


@pytest.fixture
def make_cloud(netlab, cloud, kube, control_plane, agents, tmp_path: Path):
    # netlab first: set up before the agents, torn down after them (a live agent would rebuild a router the lab's
    # teardown removed, and leave it behind)
    def make(**kwargs) -> NetworkCloud:
        return NetworkCloud(cloud, kube, control_plane, agents, netlab, tmp_path, **kwargs)
    return make


def implemented(nc: NetworkCloud, network: str) -> dict:
    return wait_for(lambda: (s := nc.status("networks", network)).get("phase") == "Implemented" and s, timeout=60,
                    what=f"network {network} Implemented")


def published_guest(nc: NetworkCloud) -> tuple[dict, str, str]:
    """Guest g1 on h2 in an isolated network "net", its HTTP port published by static NAT and a firewall rule:
    the network's status, the guest's address and the public address (reachable once this returns)."""
    offering = nc.network_offering("Isolated", ISOLATED_SERVICES)
    nc.network("net", offering)
    nc.vm("g1", ["net"], host="h2")
    nc.running("g1")
    status = implemented(nc, "net")
    address = nc.dhcp_address("g1")
    nc.create("publicipaddresses", "PublicIPAddress", "ip", {"zone": nc.zone, "network": "net",
                                                              "staticNat": {"virtualMachine": {"name": "g1"}}})
    nat_ip = wait_for(lambda: nc.status("publicipaddresses", "ip").get("ipAddress"), timeout=20, what="ip")
    nc.create("firewallrules", "FirewallRule", "http", {"publicIpAddress": "ip", "protocol": "TCP",
                                                         "ports": {"start": 80, "end": 80}})
    wait_for(lambda: http(nc.public.netns, nat_ip) == "g1", timeout=30, what="static NAT to g1")
    return status, address, nat_ip


@pytest.mark.parametrize("vswitch, isolation", [("linuxbridge", "VXLAN"), ("openvswitch", "VLAN"),
                                               ("openvswitch", "VXLAN")],
                         ids=["linuxbridge-vxlan", "openvswitch-vlan", "openvswitch-vxlan"])
def test_isolated_networks_across_two_hosts(make_cloud, vswitch: str, isolation: str) -> None:
    if vswitch == "openvswitch" and (reason := ovs.unavailable_reason()):
        pytest.skip(f"no Open vSwitch: {reason}")
    nc = make_cloud(vswitch=vswitch, isolation=isolation, vnets=(5000, 5099) if isolation == "VXLAN" else (100, 199))
    offering = nc.network_offering("Isolated", ISOLATED_SERVICES)
    nc.network("net-a", offering)
    nc.network("net-b", offering, cidr="10.2.2.0/24", gateway="10.2.2.1")
    nc.vm("a1", ["net-a"], host="h1")
    nc.vm("a2", ["net-a"], host="h2")
    nc.vm("b1", ["net-b"], host="h2")
    nc.running("a1", "a2", "b1")
    net_a, net_b = implemented(nc, "net-a"), implemented(nc, "net-b")
    assert net_a["broadcastUri"].startswith(f"{isolation.lower()}://")
    assert net_a["broadcastUri"] != net_b["broadcastUri"]
    assert net_a["gateway"] == "10.1.1.1" and net_a["router"]["state"] == "Running"

    # Every guest holds the address IPAM gave it, learnt by DHCP from its network's router.
    addresses = {vm: nc.dhcp_address(vm) for vm in ("a1", "a2", "b1")}
    for vm, address in addresses.items():
        assert address == nc.nic(vm)["ipAddress"], vm
    assert addresses["a1"].startswith("10.1.1.") and addresses["b1"].startswith("10.2.2.")

    # Same network, different hosts: the VXLAN/VLAN segment carries them; the router's DNS knows the names.
    assert nc.ping("a1", addresses["a2"]), f"a1 cannot reach a2 across the {isolation} segment"
    assert http(nc.guest_netns("a1"), addresses["a2"]) == "a2"
    assert addresses["a2"] in nc.resolve("a1", "a2"), nc.resolve("a1", "a2")
    assert addresses["a1"] in nc.resolve("a2", "a1.cloud.internal")

    # Another isolated network is unreachable, by address or through the routers.
    assert not nc.ping("a1", addresses["b1"], count=1)
    assert http(nc.guest_netns("a1"), addresses["b1"], timeout=2) is None
    assert not nc.ping("b1", addresses["a2"], count=1)

    # Source NAT: the internet sees the network's source NAT address.
    server = nc.peer_server(nc.public.netns, 8080)
    try:
        seen = tcp(nc.guest_netns("a1"), PUBLIC_GATEWAY, 8080)
        assert seen == net_a["sourceNatIp"], f"the public side saw {seen}"
        assert tcp(nc.guest_netns("b1"), PUBLIC_GATEWAY, 8080) == net_b["sourceNatIp"]
    finally:
        server.kill()


def test_port_forwarding_static_nat_firewall_egress_and_load_balancing(make_cloud) -> None:
    nc = make_cloud()
    offering = nc.network_offering("Isolated", ISOLATED_SERVICES)
    nc.network("web", offering)
    nc.vm("w1", ["web"], host="h1")
    nc.vm("w2", ["web"], host="h2")
    nc.running("w1", "w2")
    implemented(nc, "web")
    for vm in ("w1", "w2"):
        nc.dhcp_address(vm)
    public = nc.public.netns

    def address(ip: str) -> str:
        return wait_for(lambda: nc.status("publicipaddresses", ip).get("ipAddress"), timeout=20,
                        what=f"{ip} allocated")

    def applied(plural: str, name: str) -> None:
        wait_for(lambda: nc.status(plural, name).get("phase") == "Applied", timeout=30, what=f"{name} Applied")

    # Port forwarding 2222 → w1:22: closed until a firewall rule opens it (CloudStack's default deny ingress).
    nc.create("publicipaddresses", "PublicIPAddress", "ip-pf", {"zone": nc.zone, "network": "web"})
    pf_ip = address("ip-pf")
    nc.create("portforwardingrules", "PortForwardingRule", "ssh", {
        "publicIpAddress": "ip-pf", "publicPorts": {"start": 2222, "end": 2222}, "privatePorts": {"start": 22, "end": 22},
        "virtualMachine": {"name": "w1"}})
    applied("portforwardingrules", "ssh")
    assert http(public, pf_ip, 2222, timeout=2) is None, "forwarded without a firewall rule"
    nc.create("firewallrules", "FirewallRule", "allow-ssh", {
        "publicIpAddress": "ip-pf", "protocol": "TCP", "ports": {"start": 2222, "end": 2222},
        "cidrs": ["203.0.113.0/24"]})
    applied("firewallrules", "allow-ssh")
    assert wait_for(lambda: http(public, pf_ip, 2222) == "w1", timeout=20, what="port forwarding to w1")

    # Static NAT to w2, opened for another CIDR only: still closed; then for ours: open.
    nc.create("publicipaddresses", "PublicIPAddress", "ip-nat", {"zone": nc.zone, "network": "web",
                                                                   "staticNat": {"virtualMachine": {"name": "w2"}}})
    nat_ip = address("ip-nat")
    nc.create("firewallrules", "FirewallRule", "nat-http", {
        "publicIpAddress": "ip-nat", "protocol": "TCP", "ports": {"start": 80, "end": 80},
        "cidrs": ["198.51.100.0/24"]})
    applied("firewallrules", "nat-http")
    assert http(public, nat_ip, 80, timeout=2) is None, "a rule for 198.51.100.0/24 let 203.0.113.1 in"
    nc.patch("firewallrules", "nat-http", {"spec": {"cidrs": ["203.0.113.0/24"]}})
    assert wait_for(lambda: http(public, nat_ip, 80) == "w2", timeout=20, what="static NAT to w2")
    # Static NAT is two-way: w2's own connections leave from its static NAT address, not the source NAT one.
    server = nc.peer_server(public, 8081)
    try:
        assert wait_for(lambda: tcp(nc.guest_netns("w2"), PUBLIC_GATEWAY, 8081), timeout=10,
                        what="w2 reaching the public side") == nat_ip
        # Egress: allowed by default; an egress rule (an exception to Allow) blocks TCP 8081.
        assert tcp(nc.guest_netns("w1"), PUBLIC_GATEWAY, 8081) is not None
        nc.create("firewallrules", "FirewallRule", "no-8081", {
            "direction": "Egress", "network": "web", "protocol": "TCP", "ports": {"start": 8081, "end": 8081}})
        applied("firewallrules", "no-8081")
        assert tcp(nc.guest_netns("w1"), PUBLIC_GATEWAY, 8081, timeout=2) is None, "egress rule did not block"
        nc.delete("firewallrules", "no-8081")
        assert wait_for(lambda: tcp(nc.guest_netns("w1"), PUBLIC_GATEWAY, 8081, timeout=2), timeout=20,
                        what="egress open again")
    finally:
        server.kill()

    # A load balancer over both guests spreads connections round robin.
    nc.create("publicipaddresses", "PublicIPAddress", "ip-lb", {"zone": nc.zone, "network": "web"})
    lb_ip = address("ip-lb")
    nc.create("loadbalancerrules", "LoadBalancerRule", "web-lb", {
        "publicIpAddress": "ip-lb", "publicPort": 80, "privatePort": 80,
        "members": [{"name": "w1"}, {"name": "w2"}]})
    nc.create("firewallrules", "FirewallRule", "lb-http", {
        "publicIpAddress": "ip-lb", "protocol": "TCP", "ports": {"start": 80, "end": 80}})
    applied("loadbalancerrules", "web-lb")
    applied("firewallrules", "lb-http")
    wait_for(lambda: http(public, lb_ip, 80), timeout=20, what="the load balancer answering")
    answers = collections.Counter(http(public, lb_ip, 80) for _ in range(10))
    assert answers["w1"] >= 3 and answers["w2"] >= 3, answers


def test_last_stop_shuts_the_network_down_and_the_next_start_brings_it_back_unchanged(make_cloud) -> None:
    nc = make_cloud()
    offering = nc.network_offering("Isolated", ISOLATED_SERVICES)
    nc.network("net", offering)
    nc.vm("v1", ["net"], host="h1")
    nc.vm("v2", ["net"], host="h2")
    nc.running("v1", "v2")
    before = implemented(nc, "net")
    addresses = {vm: nc.dhcp_address(vm) for vm in ("v1", "v2")}
    macs = {vm: nc.nic(vm)["macAddress"] for vm in ("v1", "v2")}
    router_netns = before["router"]["namespace"]
    assert router_netns in list_netns()

    for vm in ("v1", "v2"):
        nc.patch("virtualmachines", vm, {"spec": {"state": "Stopped"}})
    shut = wait_for(lambda: (s := nc.status("networks", "net")).get("phase") == "Shutdown" and s, timeout=60,
                    what="network Shutdown")
    assert "broadcastUri" not in shut and "router" not in shut
    wait_for(lambda: nc.get("virtualrouters", "net") == {}, timeout=20, what="the VirtualRouter deleted")
    wait_for(lambda: router_netns not in list_netns(), timeout=30, what="the router's namespace removed")
    wait_for(lambda: (nc.cloud.get("physicalnetworks", nc.pnet).get("status") or {}).get("vnetsAllocated") == 0,
             timeout=20, what="the VNI released")
    assert {vm: nc.nic(vm)["ipAddress"] for vm in ("v1", "v2")} == addresses, "stopped guests lost their addresses"

    for vm in ("v1", "v2"):
        nc.patch("virtualmachines", vm, {"spec": {"state": "Running"}})
    nc.running("v1", "v2")
    after = implemented(nc, "net")
    assert after["gateway"] == before["gateway"] and after["cidr"] == before["cidr"]
    assert after["sourceNatIp"] == before["sourceNatIp"]
    for vm in ("v1", "v2"):
        assert nc.dhcp_address(vm) == addresses[vm] and nc.nic(vm)["macAddress"] == macs[vm]
    assert nc.ping("v1", addresses["v2"])


def test_killing_the_routers_agent_keeps_leases_and_forwarding(make_cloud) -> None:
    nc = make_cloud()
    status, address, nat_ip = published_guest(nc)
    router_host = status["router"]["host"]
    node = nc.status("virtualrouters", "net")["node"]
    pid = node["dnsmasqPid"]

    nc.agent_processes[router_host].kill()
    # The router outlives its agent: forwarding and DHCP go on.
    assert http(nc.public.netns, nat_ip) == "g1"
    assert f"ip={address}" in nc.renew_lease("g1")
    def records(message: str) -> int:
        return sum(1 for r in nc.agent_processes[router_host].log_records() if r.get("msg") == message)

    running_before, configured_before = records("router running"), records("router configured")
    nc.start_agent(router_host)
    wait_for(lambda: (nc.cloud.get("hosts", router_host).get("status") or {}).get("state") == "Up", timeout=40,
             what="the router's host Up again")
    wait_for(lambda: records("router running") > running_before, timeout=30,
             what="the restarted agent adopting the router")
    assert records("router configured") == configured_before, "the restarted agent reconfigured the router"
    after = nc.status("virtualrouters", "net")["node"]
    assert after["dnsmasqPid"] == pid and after["state"] == "Running", after
    assert http(nc.public.netns, nat_ip) == "g1"
    assert f"ip={address}" in nc.renew_lease("g1") and nc.guest_address("g1") == address


def test_basic_zone_security_group_allows_port_22_from_one_cidr_only(make_cloud) -> None:
    nc = make_cloud(basic=True)
    offering = nc.network_offering("Shared", ["Dhcp", "Dns", "SecurityGroup"])
    nc.network("flat", offering, cidr="10.50.0.0/24", gateway="10.50.0.1", startIp="10.50.0.10",
               endIp="10.50.0.250")
    nc.create("securitygroups", "SecurityGroup", "ssh-from-admin", {
        "description": "ssh from the admin /28 only",
        "ingress": [{"protocol": "TCP", "ports": {"start": 22, "end": 22}, "cidrs": ["10.50.0.0/28"]}]})
    nc.vm("server", nics=[{"network": {"name": "flat"}, "ipAddress": "10.50.0.100"}], host="h1",
          securityGroups=["ssh-from-admin"])
    nc.vm("admin", nics=[{"network": {"name": "flat"}, "ipAddress": "10.50.0.12"}], host="h2")
    nc.vm("outsider", nics=[{"network": {"name": "flat"}, "ipAddress": "10.50.0.200"}], host="h2")
    nc.running("server", "admin", "outsider")
    implemented(nc, "flat")
    for vm, address in (("server", "10.50.0.100"), ("admin", "10.50.0.12"), ("outsider", "10.50.0.200")):
        assert nc.dhcp_address(vm) == address
    launch = nc.status("virtualmachines", "server")["launch"]["nics"][0]
    assert launch["securityGroups"]["ingress"][0]["cidrs"] == ["10.50.0.0/28"]

    assert wait_for(lambda: http(nc.guest_netns("admin"), "10.50.0.100", 22), timeout=20,
                    what="admin reaching server:22") == "server"
    assert http(nc.guest_netns("outsider"), "10.50.0.100", 22, timeout=2) is None, "outsider reached port 22"
    assert http(nc.guest_netns("admin"), "10.50.0.100", 80, timeout=2) is None, "port 80 was not allowed"
    # Guests without groups get CloudStack's default: ingress denied, egress allowed.
    assert http(nc.guest_netns("server"), "10.50.0.12", 80, timeout=2) is None

    # Rules follow the object: opening port 80 to everyone takes effect without restarting anything.
    nc.patch("securitygroups", "ssh-from-admin", {"spec": {"ingress": [
        {"protocol": "TCP", "ports": {"start": 22, "end": 22}, "cidrs": ["10.50.0.0/28"]},
        {"protocol": "TCP", "ports": {"start": 80, "end": 80}}]}})
    assert wait_for(lambda: http(nc.guest_netns("outsider"), "10.50.0.100", 80, timeout=2), timeout=30,
                    what="port 80 opened") == "server"
    assert http(nc.guest_netns("outsider"), "10.50.0.100", 22, timeout=2) is None



def test_the_router_moves_when_its_host_fails(make_cloud) -> None:
    nc = make_cloud()
    status, address, nat_ip = published_guest(nc)
    first = status["router"]["host"]
    assert first == nc.host_names["h1"], "the least loaded host (by name on a tie) should run the router"

    # h1 fails: its agent dies and its links go dark (the router in it is cut off with it).
    nc.agent_processes[first].kill()
    for nic in ("eth0", "eth1"):
        nc.lab_hosts[first].exec(["ip", "link", "set", nic, "down"])
    moved = wait_for(lambda: (s := nc.status("networks", "net")).get("router", {}).get("host") not in (None, first)
                     and s.get("phase") == "Implemented" and s, timeout=90, what="the router moved and running")
    assert moved["router"]["host"] == nc.host_names["h2"]
    assert nc.status("virtualmachines", "g1")["phase"] == "Running", "the guest was disturbed by the move"
    assert moved["sourceNatIp"] == status["sourceNatIp"] and moved["broadcastUri"] == status["broadcastUri"]
    assert wait_for(lambda: http(nc.public.netns, nat_ip) == "g1", timeout=20, what="static NAT via the new router")
    assert f"ip={address}" in nc.renew_lease("g1", timeout=30)
    server = nc.peer_server(nc.public.netns, 8082)
    try:
        assert wait_for(lambda: tcp(nc.guest_netns("g1"), PUBLIC_GATEWAY, 8082), timeout=10,
                        what="g1 reaching the public side") == nat_ip
    finally:
        server.kill()
