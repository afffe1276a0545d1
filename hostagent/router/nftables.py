"""The router's nftables ruleset, rendered from a :class:`VirtualRouterSpec` (pure: no I/O).

Everything lives in one table, ``ip cumulo``, loaded with ``nft -f`` as a single transaction that creates the
table if missing, deletes it and defines it anew: the kernel swaps old rules for new atomically, and a failed
load leaves the old ruleset in place. The table's comment carries a digest of the rest of the text, so the
agent tells an up-to-date router from one needing a load without comparing rule listings (an agent restart
then loads nothing, leaving handles and counters as they were).

Semantics (CloudStack's virtual router):

* ``prerouting`` (dstnat): port forwarding and load balancers (most specific first), then static NAT. Rules
  match the public address whatever the input interface, so a guest reaching its own network's public
  address (hairpin) is translated too.
* ``postrouting`` (srcnat): a static NAT guest leaves as its public address, every other guest as the
  source NAT address; hairpinned connections are masqueraded to the router's guest address so the reply
  comes back through the router.
* ``forward`` (policy drop): established/related first; connections from the public side NATed to a guest
  (``ct status dnat``) go through ``firewall``; hairpinned ones (a guest to a public address of its own
  network, NATed back in) pass, as the firewall guards the public side only; new guest → public connections
  go through ``egress``; nothing else passes.
* ``firewall``: ingress to a public address, allowed by FirewallRules only. DNAT has already rewritten the
  destination by the forward hook, so rules match ``ct original ip daddr`` / ``ct original proto-dst``.
* ``egress``: guest → public, ``egressDefaultAllow`` with the egress rules as exceptions.
* ``input`` (policy drop): loopback, established/related, DHCP, DNS and ICMP from guests, and from the public
  side only what ``firewall`` allows.

Load balancers: RoundRobin is ``numgen inc mod N``, Source is ``jhash ip saddr mod N``, both mapped to the
members (the nat chain sees only a connection's first packet, so a connection sticks to its member).
LeastConn needs connection counts per member, which a stateless nat map cannot see: it falls back to round
robin, with a warning the agent reports.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import re
from collections.abc import Iterable

from controllers.api.v1alpha1.network import TrafficRule
from controllers.api.v1alpha1.virtualrouter import LoadBalancer, PortForward, VirtualRouterSpec

from . import GUEST_IFNAME, PUBLIC_IFNAME

FAMILY = "ip"
TABLE = "cumulo"
DIGEST_TAG = "cumulo-router"
_DIGEST = re.compile(rf'comment "{DIGEST_TAG} ([0-9a-f]+)"')
ANYWHERE = ipaddress.IPv4Network("0.0.0.0/0")


class RulesetError(ValueError):
    """The spec cannot be expressed as rules (a malformed address, an unknown protocol)."""


@dataclasses.dataclass(frozen=True)
class Ruleset:
    text: str             # the nft -f input
    digest: str           # also in the table's comment
    warnings: tuple[str, ...] = ()


def applied_digest(listing: str) -> str | None:
    """The digest in the output of ``nft list table ip cumulo`` (None: not a table this module made)."""
    match = _DIGEST.search(listing)
    return match.group(1) if match else None


# -- values ------------------------------------------------------------------------------------------


def _address(value: str, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise RulesetError(f"{what}: {value!r} is not an IPv4 address") from None


def _cidrs(values: Iterable[str], what: str) -> list[str]:
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.IPv4Network(value, strict=False))
        except ValueError:
            raise RulesetError(f"{what}: {value!r} is not an IPv4 CIDR") from None
    if any(network == ANYWHERE for network in networks):
        return []  # anywhere: no match at all
    return [str(network) for network in ipaddress.collapse_addresses(networks)]


def _saddr(cidrs: list[str]) -> list[str]:
    if not cidrs:
        return []
    return [f"ip saddr {cidrs[0]}" if len(cidrs) == 1 else f"ip saddr {{ {', '.join(cidrs)} }}"]


def _port(value: int, what: str) -> int:
    if not 1 <= value <= 65535:
        raise RulesetError(f"{what}: port {value} is outside 1-65535")
    return value


def _ports(start: int, end: int | None, what: str) -> str:
    end = start if end is None else end
    _port(start, what), _port(end, what)
    if end < start:
        raise RulesetError(f"{what}: port range {start}-{end} ends before it starts")
    return str(start) if start == end else f"{start}-{end}"


def _l4(protocol: str, what: str) -> str:
    name = protocol.lower()
    if name not in ("tcp", "udp"):
        raise RulesetError(f"{what}: protocol {protocol!r} is not TCP or UDP")
    return name


def _quoted(ifname: str) -> str:
    return f'"{ifname}"'


def traffic_match(rule: TrafficRule, *, original_destination: bool, what: str) -> list[str]:
    """The protocol/port/ICMP part of a firewall or egress rule. ``original_destination``: match the port as
    the connection was addressed before DNAT."""
    protocol = rule.protocol.lower()
    if protocol == "all":
        return []
    if protocol in ("tcp", "udp"):
        match = [f"meta l4proto {protocol}"]
        if rule.port_start is not None:
            ports = _ports(rule.port_start, rule.port_end, what)
            match.append(f"ct original proto-dst {ports}" if original_destination else f"{protocol} dport {ports}")
        return match
    if protocol == "icmp":
        match = ["meta l4proto icmp"]
        for field, value in (("type", rule.icmp_type), ("code", rule.icmp_code)):
            if value is not None and value != -1:
                if not 0 <= value <= 255:
                    raise RulesetError(f"{what}: ICMP {field} {value} is outside 0-255")
                match.append(f"icmp {field} {value}")
        return match
    raise RulesetError(f"{what}: protocol {rule.protocol!r} is not TCP, UDP, ICMP or All")


# -- chains -------------------------------------------------------------------------------------------


def _port_forward(forward: PortForward) -> str:
    what = f"port forward {forward.name}"
    public_ip, private_ip = _address(forward.public_ip, what), _address(forward.private_ip, what)
    l4 = _l4(forward.protocol, what)
    ports = _ports(forward.public_port_start, forward.public_port_end, what)
    length = forward.public_port_end - forward.public_port_start
    _ports(forward.private_port_start, forward.private_port_start + length, what)
    match = [f"ip daddr {public_ip}", *_saddr(_cidrs(forward.source_cidrs, what)), f"{l4} dport {ports}"]
    if forward.private_port_start == forward.public_port_start:
        target = private_ip  # same ports: only the address changes
    elif length == 0:
        target = f"{private_ip}:{forward.private_port_start}"
    else:
        # A shifted range: one map element per port (nft has no port arithmetic).
        pairs = ", ".join(f"{forward.public_port_start + offset} : {forward.private_port_start + offset}"
                          for offset in range(length + 1))
        target = f"{private_ip} : {l4} dport map {{ {pairs} }}"
    return f"{' '.join(match)} dnat to {target}"


def _load_balancer(balancer: LoadBalancer, warnings: list[str]) -> str | None:
    what = f"load balancer {balancer.name}"
    public_ip = _address(balancer.public_ip, what)
    l4 = _l4(balancer.protocol, what)
    _port(balancer.public_port, what), _port(balancer.private_port, what)
    members = [_address(member, what) for member in balancer.members]
    if not members:
        return None  # nothing to balance to: the port stays closed
    match = [f"ip daddr {public_ip}", *_saddr(_cidrs(balancer.source_cidrs, what)),
             f"{l4} dport {balancer.public_port}"]
    algorithm = balancer.algorithm
    if algorithm == "LeastConn":
        warnings.append(f"{what}: LeastConn cannot be done by stateless nftables NAT; using RoundRobin")
        algorithm = "RoundRobin"
    if len(members) == 1:
        return f"{' '.join(match)} dnat to {members[0]}:{balancer.private_port}"
    if algorithm == "RoundRobin":
        selector = f"numgen inc mod {len(members)}"
    elif algorithm == "Source":
        selector = f"jhash ip saddr mod {len(members)}"
    else:
        raise RulesetError(f"{what}: algorithm {algorithm!r} is not RoundRobin, LeastConn or Source")
    table = ", ".join(f"{index} : {member}" for index, member in enumerate(members))
    return f"{' '.join(match)} dnat to {selector} map {{ {table} }} : {balancer.private_port}"


def _chain(name: str, hook: str | None, rules: list[str], *, policy: str = "accept") -> list[str]:
    lines = [f"  chain {name} {{"]
    if hook is not None:
        kind, hook_name, priority = hook.split()
        lines.append(f"    type {kind} hook {hook_name} priority {priority}; policy {policy};")
    lines += [f"    {rule}" for rule in rules]
    lines.append("  }")
    return lines


def render(spec: VirtualRouterSpec, *, guest_if: str = GUEST_IFNAME, public_if: str = PUBLIC_IFNAME) -> Ruleset:
    """The ruleset of ``spec``. Raises :class:`RulesetError` with a message fit for a status field."""
    warnings: list[str] = []
    guest, lan = _guest(spec)
    guest_q, public_q = _quoted(guest_if), _quoted(public_if)
    public = spec.public is not None

    dnat: list[str] = []
    snat: list[str] = []
    firewall: list[str] = []
    egress: list[str] = []
    if public:
        for forward in spec.port_forwards:
            dnat.append(_port_forward(forward))
        for balancer in spec.load_balancers:
            rule = _load_balancer(balancer, warnings)
            if rule is not None:
                dnat.append(rule)
        for entry in spec.static_nats:
            public_ip = _address(entry.public_ip, "static NAT")
            private_ip = _address(entry.private_ip, "static NAT")
            dnat.append(f"ip daddr {public_ip} dnat to {private_ip}")
            snat.append(f"oifname {public_q} ip saddr {private_ip} snat to {public_ip}")
        if spec.source_nat_ip:
            snat.append(f"oifname {public_q} ip saddr {lan} snat to {_address(spec.source_nat_ip, 'sourceNatIp')}")
        # Hairpin: a guest reaching a public address NATed back into its own network.
        snat.append(f"iifname {guest_q} oifname {guest_q} ip saddr {lan} ct status dnat snat to {guest}")
        for index, rule in enumerate(spec.firewall):
            what = f"firewall rule {index} ({rule.public_ip})"
            match = [f"ct original ip daddr {_address(rule.public_ip, what)}",
                     *_saddr(_cidrs(rule.cidrs, what)),
                     *traffic_match(rule, original_destination=True, what=what)]
            firewall.append(f"{' '.join(match)} counter accept")
        verdict = "drop" if spec.egress_default_allow else "accept"
        for index, rule in enumerate(spec.egress):
            what = f"egress rule {index}"
            match = [*_daddr(_cidrs(rule.cidrs, what)), *traffic_match(rule, original_destination=False, what=what)]
            egress.append(f"{' '.join(match)} counter {verdict}".strip())
        egress.append(f"counter {'accept' if spec.egress_default_allow else 'drop'}")
    firewall.append("counter drop")

    established = ["ct state established,related accept", "ct state invalid drop"]
    input_rules = ['iif "lo" accept', *established]
    if spec.dhcp:
        input_rules.append(f"iifname {guest_q} udp dport 67 accept")
    if spec.dns:
        input_rules.append(f"iifname {guest_q} meta l4proto {{ tcp, udp }} th dport 53 accept")
    input_rules.append(f"iifname {guest_q} meta l4proto icmp accept")
    if public:
        input_rules.append(f"iifname {public_q} jump firewall")
    forward_rules = [*established]
    if public:
        forward_rules += [f"iifname {public_q} ct status dnat jump firewall",
                          f"iifname {guest_q} oifname {guest_q} ct status dnat accept",  # hairpin
                          f"iifname {guest_q} oifname {public_q} jump egress"]

    body = [
        *_chain("prerouting", "nat prerouting dstnat", dnat),
        *_chain("postrouting", "nat postrouting srcnat", snat),
        *_chain("input", "filter input filter", input_rules, policy="drop"),
        *_chain("forward", "filter forward filter", forward_rules, policy="drop"),
        *_chain("firewall", None, firewall),
        *_chain("egress", None, egress),
    ]
    digest = hashlib.sha256("\n".join(body).encode()).hexdigest()[:16]
    text = "\n".join([
        "# Cumulo virtual router: generated by the host agent; loaded as one transaction.",
        f"table {FAMILY} {TABLE}",
        f"delete table {FAMILY} {TABLE}",
        f"table {FAMILY} {TABLE} {{",
        f'  comment "{DIGEST_TAG} {digest}"',
        *body,
        "}",
        "",
    ])
    return Ruleset(text, digest, tuple(warnings))


def _guest(spec: VirtualRouterSpec) -> tuple[str, str]:
    """(router's guest address, guest CIDR)."""
    if not spec.guest.addresses:
        raise RulesetError("guest interface has no address")
    try:
        interface = ipaddress.IPv4Interface(spec.guest.addresses[0])
    except ValueError:
        raise RulesetError(f"guest address {spec.guest.addresses[0]!r} is not IPv4 CIDR notation") from None
    return str(interface.ip), str(interface.network)


def _daddr(cidrs: list[str]) -> list[str]:
    if not cidrs:
        return []
    return [f"ip daddr {cidrs[0]}" if len(cidrs) == 1 else f"ip daddr {{ {', '.join(cidrs)} }}"]
