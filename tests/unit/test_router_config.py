"""The virtual router's rendered configuration (hostagent.router.nftables, hostagent.router.dnsmasq): pure."""

from __future__ import annotations

import typing as t

import pytest

from controllers.api.v1alpha1.virtualrouter import VirtualRouterSpec
from hostagent.router import dnsmasq, host_veths, netns_name, netns_prefix, nftables

NETWORK_UID = "0123abcd-0000-4000-8000-000000000001"


def router(**fields: t.Any) -> VirtualRouterSpec:
    raw: dict[str, t.Any] = {
        "network": "net1", "networkUid": NETWORK_UID, "host": "h1",
        "guest": {"segment": {"trafficLabel": "cloudbr0", "bridge": "brvx-5001", "broadcastUri": "vxlan://5001",
                              "mtu": 1450},
                  "macAddress": "02:00:0a:01:01:01", "addresses": ["10.1.1.1/24"]},
        "gateway": "10.1.1.1",
        "public": {"segment": {"trafficLabel": "cloudbr1", "bridge": "cloudbr1"}, "macAddress": "02:00:cb:00:71:0a",
                   "addresses": ["203.0.113.10/24", "203.0.113.11/24", "203.0.113.12/24"]},
        "publicGateway": "203.0.113.1", "sourceNatIp": "203.0.113.10", "dnsServers": ["192.0.2.53"],
        "leases": [{"macAddress": "02:00:0a:01:01:05", "ipAddress": "10.1.1.5", "hostname": "web1"},
                   {"macAddress": "02:00:0A:01:01:06", "ipAddress": "10.1.1.6", "hostname": "web2", "default": False}],
    }
    raw.update(fields)
    return VirtualRouterSpec.model_validate(raw)


def rules(spec: VirtualRouterSpec) -> str:
    return nftables.render(spec).text


def chain(text: str, name: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(f"  chain {name} {{")
    end = lines.index("  }", start)
    return [line.strip() for line in lines[start + 1:end] if not line.strip().startswith("type ")]


# -- names ------------------------------------------------------------------------------------------------


def test_names_are_per_host_namespace_and_fit_linux_limits():
    assert netns_name("nl1a2b-h1", NETWORK_UID) == "nl1a2b-h1-vr-0123abcd"
    assert netns_name(None, NETWORK_UID) == "cumulo-vr-0123abcd"
    assert netns_prefix(None) == "cumulo-vr-"
    assert host_veths(NETWORK_UID) == ("vrg0123ab", "vrp0123ab")
    assert all(len(name) <= 15 for name in host_veths(NETWORK_UID))


# -- nftables -----------------------------------------------------------------------------------------------


def test_one_transaction_replaces_the_table_and_carries_its_digest():
    ruleset = nftables.render(router())
    lines = ruleset.text.splitlines()
    assert lines[1:4] == ["table ip cumulo", "delete table ip cumulo", "table ip cumulo {"]
    assert nftables.applied_digest(ruleset.text) == ruleset.digest
    listing = f'table ip cumulo {{ # handle 3\n\tcomment "cumulo-router {ruleset.digest}"\n\tchain input {{'
    assert nftables.applied_digest(listing) == ruleset.digest
    assert nftables.applied_digest("table ip cumulo {\n}") is None
    # Same spec, same digest; any change of rules, a new one.
    assert nftables.render(router()).digest == ruleset.digest
    assert nftables.render(router(sourceNatIp="203.0.113.11")).digest != ruleset.digest


def test_source_nat_of_guests_leaving_the_public_interface():
    assert chain(rules(router()), "postrouting") == [
        'oifname "eth1" ip saddr 10.1.1.0/24 snat to 203.0.113.10',
        'iifname "eth0" oifname "eth0" ip saddr 10.1.1.0/24 ct status dnat snat to 10.1.1.1',  # hairpin
    ]


def test_static_nat_is_one_to_one_and_wins_over_source_nat():
    text = rules(router(staticNats=[{"publicIp": "203.0.113.11", "privateIp": "10.1.1.5"}]))
    assert chain(text, "prerouting") == ["ip daddr 203.0.113.11 dnat to 10.1.1.5"]
    assert chain(text, "postrouting")[:2] == ['oifname "eth1" ip saddr 10.1.1.5 snat to 203.0.113.11',
                                              'oifname "eth1" ip saddr 10.1.1.0/24 snat to 203.0.113.10']


def test_port_forwarding_ranges_and_source_cidrs():
    forwards = [
        {"name": "same", "publicIp": "203.0.113.10", "publicPortStart": 22, "publicPortEnd": 22,
         "privateIp": "10.1.1.5", "privatePortStart": 22},
        {"name": "one", "publicIp": "203.0.113.10", "protocol": "UDP", "publicPortStart": 5353,
         "publicPortEnd": 5353, "privateIp": "10.1.1.5", "privatePortStart": 53},
        {"name": "shift", "publicIp": "203.0.113.10", "publicPortStart": 8080, "publicPortEnd": 8082,
         "privateIp": "10.1.1.6", "privatePortStart": 80, "sourceCidrs": ["198.51.100.0/24", "192.0.2.7/32"]},
    ]
    assert chain(rules(router(portForwards=forwards)), "prerouting") == [
        "ip daddr 203.0.113.10 tcp dport 22 dnat to 10.1.1.5",
        "ip daddr 203.0.113.10 udp dport 5353 dnat to 10.1.1.5:53",
        "ip daddr 203.0.113.10 ip saddr { 192.0.2.7/32, 198.51.100.0/24 } tcp dport 8080-8082 "
        "dnat to 10.1.1.6 : tcp dport map { 8080 : 80, 8081 : 81, 8082 : 82 }",
    ]


def test_load_balancer_algorithms():
    members = ["10.1.1.5", "10.1.1.6"]
    balancers = [
        {"name": "rr", "publicIp": "203.0.113.12", "publicPort": 80, "privatePort": 8000, "members": members},
        {"name": "src", "publicIp": "203.0.113.12", "publicPort": 81, "privatePort": 8000, "algorithm": "Source",
         "members": members},
        {"name": "one", "publicIp": "203.0.113.12", "publicPort": 82, "privatePort": 8000, "members": members[:1]},
        {"name": "none", "publicIp": "203.0.113.12", "publicPort": 83, "privatePort": 8000, "members": []},
    ]
    ruleset = nftables.render(router(loadBalancers=balancers))
    assert chain(ruleset.text, "prerouting") == [
        "ip daddr 203.0.113.12 tcp dport 80 dnat to numgen inc mod 2 map { 0 : 10.1.1.5, 1 : 10.1.1.6 } : 8000",
        "ip daddr 203.0.113.12 tcp dport 81 dnat to jhash ip saddr mod 2 map { 0 : 10.1.1.5, 1 : 10.1.1.6 } : 8000",
        "ip daddr 203.0.113.12 tcp dport 82 dnat to 10.1.1.5:8000",
    ]
    assert ruleset.warnings == ()


def test_least_conn_falls_back_to_round_robin_with_a_warning():
    ruleset = nftables.render(router(loadBalancers=[
        {"name": "lc", "publicIp": "203.0.113.12", "publicPort": 80, "privatePort": 8000, "algorithm": "LeastConn",
         "members": ["10.1.1.5", "10.1.1.6"]}]))
    assert "numgen inc mod 2" in chain(ruleset.text, "prerouting")[0]
    assert ruleset.warnings == ("load balancer lc: LeastConn cannot be done by stateless nftables NAT; "
                                "using RoundRobin",)


def test_forwarding_is_stateful_and_ingress_goes_through_the_firewall():
    assert chain(rules(router()), "forward") == [
        "ct state established,related accept", "ct state invalid drop", 'iifname "eth1" ct status dnat jump firewall',
        'iifname "eth0" oifname "eth0" ct status dnat accept', 'iifname "eth0" oifname "eth1" jump egress']


def test_firewall_matches_the_original_destination():
    firewall = [
        {"publicIp": "203.0.113.10", "protocol": "TCP", "portStart": 8080, "portEnd": 8082,
         "cidrs": ["198.51.100.0/24"]},
        {"publicIp": "203.0.113.11", "protocol": "ICMP", "icmpType": 8, "icmpCode": -1},
        {"publicIp": "203.0.113.11", "protocol": "UDP", "portStart": 53},
        {"publicIp": "203.0.113.12", "protocol": "All", "cidrs": ["0.0.0.0/0", "10.0.0.0/8"]},
    ]
    assert chain(rules(router(firewall=firewall)), "firewall") == [
        "ct original ip daddr 203.0.113.10 ip saddr 198.51.100.0/24 meta l4proto tcp "
        "ct original proto-dst 8080-8082 counter accept",
        "ct original ip daddr 203.0.113.11 meta l4proto icmp icmp type 8 counter accept",
        "ct original ip daddr 203.0.113.11 meta l4proto udp ct original proto-dst 53 counter accept",
        "ct original ip daddr 203.0.113.12 counter accept",
        "counter drop",
    ]


def test_egress_rules_are_exceptions_to_the_default():
    egress = [{"protocol": "TCP", "portStart": 80, "portEnd": 80, "cidrs": ["198.51.100.0/24"]},
              {"protocol": "All"}]
    assert chain(rules(router(egress=egress)), "egress") == [
        "ip daddr 198.51.100.0/24 meta l4proto tcp tcp dport 80 counter drop", "counter drop", "counter accept"]
    assert chain(rules(router(egress=egress[:1], egressDefaultAllow=False)), "egress") == [
        "ip daddr 198.51.100.0/24 meta l4proto tcp tcp dport 80 counter accept", "counter drop"]


def test_the_router_itself_serves_guests_and_firewalls_the_public_side():
    assert chain(rules(router()), "input") == [
        'iif "lo" accept', "ct state established,related accept", "ct state invalid drop",
        'iifname "eth0" udp dport 67 accept', 'iifname "eth0" meta l4proto { tcp, udp } th dport 53 accept',
        'iifname "eth0" meta l4proto icmp accept', 'iifname "eth1" jump firewall']
    assert 'udp dport 67' not in "".join(chain(rules(router(dhcp=False, dns=False)), "input"))


def test_a_router_without_public_interface_does_dhcp_and_dns_only():
    text = rules(router(public=None, sourceNatIp=None, publicGateway=None,
                        staticNats=[{"publicIp": "203.0.113.11", "privateIp": "10.1.1.5"}]))
    assert chain(text, "prerouting") == [] and chain(text, "postrouting") == []
    assert chain(text, "forward") == ["ct state established,related accept", "ct state invalid drop"]
    assert chain(text, "egress") == []


@pytest.mark.parametrize("fields, message", [
    ({"sourceNatIp": "203.0.113.300"}, "sourceNatIp: '203.0.113.300' is not an IPv4 address"),
    ({"firewall": [{"publicIp": "203.0.113.10", "protocol": "GRE"}]}, "protocol 'GRE' is not TCP, UDP, ICMP or All"),
    ({"firewall": [{"publicIp": "203.0.113.10", "protocol": "TCP", "portStart": 90, "portEnd": 80}]},
     "port range 90-80 ends before it starts"),
    ({"egress": [{"cidrs": ["10.1.1.0/33"]}]}, "'10.1.1.0/33' is not an IPv4 CIDR"),
    ({"portForwards": [{"name": "x", "publicIp": "203.0.113.10", "protocol": "ICMP", "publicPortStart": 1,
                        "publicPortEnd": 1, "privateIp": "10.1.1.5", "privatePortStart": 1}]}, "not TCP or UDP"),
    ({"portForwards": [{"name": "x", "publicIp": "203.0.113.10", "publicPortStart": 65530, "publicPortEnd": 65535,
                        "privateIp": "10.1.1.5", "privatePortStart": 65533}]}, "outside 1-65535"),
    ({"loadBalancers": [{"name": "x", "publicIp": "203.0.113.12", "publicPort": 80, "privatePort": 80,
                         "algorithm": "Random", "members": ["10.1.1.5", "10.1.1.6"]}]}, "algorithm 'Random'"),
])
def test_bad_rules_are_refused_with_a_reason(fields, message):
    with pytest.raises(nftables.RulesetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        nftables.render(router(**fields))


# -- dnsmasq --------------------------------------------------------------------------------------------------

PATHS = dnsmasq.Paths("/var/lib/cumulo/routers/" + NETWORK_UID)


def config_lines(spec: VirtualRouterSpec) -> list[str]:
    return [line for line in dnsmasq.render(spec, PATHS).config.splitlines() if not line.startswith("#")]


def test_dnsmasq_serves_the_guest_interface_only_from_its_state_directory():
    lines = config_lines(router())
    for line in ["interface=eth0", "except-interface=lo", "bind-interfaces", "no-resolv", "no-hosts",
                 f"pid-file={PATHS.directory}/dnsmasq.pid", f"dhcp-leasefile={PATHS.directory}/dnsmasq.leases",
                 f"dhcp-hostsfile={PATHS.directory}/dhcp-hosts", f"addn-hosts={PATHS.directory}/hosts",
                 "dhcp-range=10.1.1.0,static,255.255.255.0,3600", "dhcp-ignore=tag:!known", "dhcp-authoritative",
                 "domain=cloud.internal", "local=/cloud.internal/", "server=192.0.2.53",
                 "dhcp-option=option:mtu,1450"]:
        assert line in lines


def test_fixed_leases_and_names():
    files = dnsmasq.render(router(), PATHS)
    assert files.dhcp_hosts == "02:00:0a:01:01:05,10.1.1.5,web1\n02:00:0a:01:01:06,set:nodefault,10.1.1.6,web2\n"
    assert files.addn_hosts == ("10.1.1.5 web1.cloud.internal web1\n10.1.1.6 web2.cloud.internal web2\n")


def test_a_non_default_nic_gets_no_router_and_no_dns_server():
    lines = config_lines(router())
    assert [line for line in lines if line.startswith("dhcp-option=tag:")] == [
        "dhcp-option=tag:!nodefault,option:router,10.1.1.1",
        "dhcp-option=tag:!nodefault,option:dns-server,10.1.1.1",
        "dhcp-option=tag:nodefault,option:router",
        "dhcp-option=tag:nodefault,option:dns-server",
    ]


def test_without_gateway_no_router_option_and_without_dns_upstream_servers_are_offered():
    lines = config_lines(router(gateway=None, dns=False))
    assert "dhcp-option=tag:!nodefault,option:router" in lines
    assert "dhcp-option=tag:!nodefault,option:dns-server,192.0.2.53" in lines
    assert "port=0" in lines and not any(line.startswith("addn-hosts") for line in lines)
    assert not dnsmasq.needed(router(dhcp=False, dns=False))


def test_a_bad_hostname_is_served_by_address_only():
    files = dnsmasq.render(router(leases=[{"macAddress": "02:00:0a:01:01:05", "ipAddress": "10.1.1.5",
                                           "hostname": "bad_name"}]), PATHS)
    assert files.dhcp_hosts == "02:00:0a:01:01:05,10.1.1.5\n" and files.addn_hosts == ""
    assert files.warnings and "bad_name" in files.warnings[0]


@pytest.mark.parametrize("lease, message", [
    ({"macAddress": "02:00:0a:01:01", "ipAddress": "10.1.1.5", "hostname": "a"}, "malformed"),
    ({"macAddress": "02:00:0a:01:01:05", "ipAddress": "10.1.2.5", "hostname": "a"}, "outside the guest network"),
])
def test_bad_leases_are_refused(lease, message):
    with pytest.raises(dnsmasq.DnsmasqConfigError, match=message):
        dnsmasq.render(router(leases=[lease]), PATHS)


def test_what_a_running_dnsmasq_needs():
    files = dnsmasq.render(router(), PATHS)
    loaded = {"pid": 42, **files.digests()}
    assert dnsmasq.change(loaded, files) is dnsmasq.Change.NONE
    assert dnsmasq.change(None, files) is dnsmasq.Change.RESTART
    more = router(leases=[*router().model_dump(by_alias=True)["leases"],
                          {"macAddress": "02:00:0a:01:01:07", "ipAddress": "10.1.1.7", "hostname": "web3"}])
    assert dnsmasq.change(loaded, dnsmasq.render(more, PATHS)) is dnsmasq.Change.RELOAD
    assert dnsmasq.change(loaded, dnsmasq.render(router(domain="example.org"), PATHS)) is dnsmasq.Change.RESTART
