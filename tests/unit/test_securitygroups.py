"""Security group rendering: the nft script replacing both tables, rule translation, anti-spoofing."""

from __future__ import annotations

from controllers.api.v1alpha1.network import TrafficRule
from controllers.api.v1alpha1.virtualmachine import LaunchNic, SecurityGroupPolicy
from hostagent.securitygroups import GuestNic, guest_nics, render, rule_matches
from hostagent.vmspec import nic_port

UID = "0123abcd-4567-89ab-cdef-000000000001"


def nic(policy: SecurityGroupPolicy, ip: str | None = "10.0.0.5") -> GuestNic:
    return GuestNic(uid=UID, device_id=0, port=nic_port(UID, 0), mac="02:00:0a:00:00:05", ip=ip, policy=policy)


def test_rule_translation() -> None:
    assert rule_matches(TrafficRule(protocol="TCP", port_start=22, port_end=22, cidrs=["10.0.1.0/24"]), "saddr") == [
        "ip saddr 10.0.1.0/24", "tcp dport 22"]
    assert rule_matches(TrafficRule(protocol="UDP", port_start=1000, port_end=2000,
                                    cidrs=["10.0.0.7/32", "10.9.0.9/16"]), "saddr") == [
        "ip saddr { 10.0.0.7, 10.9.0.0/16 }", "udp dport 1000-2000"]
    assert rule_matches(TrafficRule(protocol="ICMP", icmp_type=8, icmp_code=0), "saddr") == ["icmp type 8",
                                                                                             "icmp code 0"]
    assert rule_matches(TrafficRule(protocol="ICMP", icmp_type=-1), "daddr") == ["meta l4proto icmp"]
    assert rule_matches(TrafficRule(protocol="TCP"), "daddr") == ["meta l4proto tcp"]
    assert rule_matches(TrafficRule(protocol="All"), "daddr") == []
    assert rule_matches(TrafficRule(protocol="All", cidrs=["2001:db8::/32"]), "daddr") is None


def test_default_deny_ingress_and_allow_all_egress() -> None:
    script = render([nic(SecurityGroupPolicy(ingress=[TrafficRule(protocol="TCP", port_start=22, port_end=22,
                                                                  cidrs=["10.0.1.0/24"])]))])
    chain = "0123abcd4567-0"
    assert "ct state established,related accept" in script
    assert f"ip daddr 10.0.0.5 jump ingress-{chain}" in script
    assert f"\t\tip saddr 10.0.1.0/24 tcp dport 22 accept\n\t\tdrop\n" in script
    assert "egress-" not in script  # egress allowed: no chain at all
    assert f'iifname "vn0123abcd0" jump spoof-{chain}' in script
    assert "ether saddr != 02:00:0a:00:00:05 drop" in script and "ip saddr != 10.0.0.5 drop" in script
    assert "arp saddr ip != 10.0.0.5 drop" in script


def test_egress_rules_return_so_ingress_of_the_peer_applies() -> None:
    script = render([nic(SecurityGroupPolicy(egress=[TrafficRule(protocol="UDP", port_start=53, port_end=53)]))])
    assert "\t\tudp dport 53 return\n\t\tdrop\n" in script
    deny_all = render([nic(SecurityGroupPolicy(egress_default_allow=False))])
    assert "chain egress-0123abcd4567-0 {\n\t\tdrop\n" in deny_all


def test_atomic_replacement_and_empty_set() -> None:
    script = render([nic(SecurityGroupPolicy())])
    assert script.startswith("table inet cumulo_sg {}\ndelete table inet cumulo_sg\n"
                             "table bridge cumulo_sg {}\ndelete table bridge cumulo_sg\n")
    assert render([]) == ("table inet cumulo_sg {}\ndelete table inet cumulo_sg\n"
                          "table bridge cumulo_sg {}\ndelete table bridge cumulo_sg\n")


def test_nic_without_address_gets_mac_spoofing_only() -> None:
    script = render([nic(SecurityGroupPolicy(), ip=None)])
    assert "ether saddr != 02:00:0a:00:00:05 drop" in script and "ingress-" not in script


def test_guest_nics_only_with_policies() -> None:
    base = dict(network="ns/n", bridge="cloudbr0", traffic_label="cloudbr0")
    nics = [LaunchNic(device_id=1, mac_address="02:00:00:00:00:02", ip_address="10.0.0.2", **base),
            LaunchNic(device_id=0, mac_address="02:00:00:00:00:01", ip_address="10.0.0.1",
                      security_groups=SecurityGroupPolicy(groups=["web"]), **base)]
    found = guest_nics(UID, nics, nic_port)
    assert [(n.device_id, n.port, n.ip) for n in found] == [(0, "vn0123abcd0", "10.0.0.1")]
