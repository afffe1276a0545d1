"""Security groups on the host (basic zones): a NIC's resolved :class:`SecurityGroupPolicy` enforced with
nftables in the host's network namespace, for guests on Linux bridge segments.

Why this shape: stateful filtering needs conntrack, and this kernel has no ``nf_conntrack_bridge`` (``ct`` in a
``bridge`` table fails), so the stateful part is an ``inet`` table that sees bridged IPv4 through br_netfilter
(``net.bridge.bridge-nf-call-iptables=1`` in the host namespace). br_netfilter shows bridged packets with the
bridge as their interface, not the guest's port, so those rules select guests by address:

``table inet cumulo_sg``
    ``forward``/``input``/``output`` base chains: established/related traffic passes, DHCP passes, then per guest
    address ``ip saddr <guest> jump egress-…`` (allowed → ``return``, so the destination's ingress still
    applies; else drop; no chain when all egress is allowed) and ``ip daddr <guest> jump ingress-…`` (allowed
    → accept, else drop: default deny ingress).

``table bridge cumulo_sg``
    anti-spoofing on the guest's own port (its tap or veth end): frames entering the bridge from the port must
    carry the NIC's MAC, ARP must claim its IP, IPv4 must come from its IP (DHCP's 0.0.0.0 excepted).

The tables hold every guest of the host and are replaced whole in one ``nft -f`` transaction (delete + add
of both tables), so no packet ever sees a half-applied set. The agent keeps each guest's entry in a file
(``<state_dir>/sg/<host_netns or root>/<uid>.json``): the full set is known again after an agent restart,
before every guest has been reconciled, and one guest's change never drops another's rules.

:func:`render` is pure (unit-tested); :class:`SecurityGroupEnforcer` does the files and runs nft.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import os
import typing as t
from collections.abc import Iterable, Sequence

from controllers.api.v1alpha1.network import TrafficRule
from controllers.api.v1alpha1.virtualmachine import LaunchNic, SecurityGroupPolicy

from .executor import CommandError, Executor, check

TABLE = "cumulo_sg"
DHCP = "udp sport 68 udp dport 67 accept", "udp sport 67 udp dport 68 accept"


class SecurityGroupError(Exception):
    """The host cannot enforce security groups; the message is fit for a status field."""


@dataclasses.dataclass(frozen=True)
class GuestNic:
    """One guest NIC under security groups: where it plugs in, its addresses, its policy."""

    uid: str                   # the VirtualMachine's
    device_id: int
    port: str                  # host-side interface (tap / veth end)
    mac: str
    ip: str | None
    policy: SecurityGroupPolicy

    @property
    def chain_id(self) -> str:
        return f"{self.uid.replace('-', '')[:12]}-{self.device_id}"

    def to_json(self) -> dict[str, t.Any]:
        return {"uid": self.uid, "deviceId": self.device_id, "port": self.port, "mac": self.mac, "ip": self.ip,
                "policy": self.policy.model_dump(by_alias=True, mode="json")}

    @classmethod
    def from_json(cls, data: dict[str, t.Any]) -> GuestNic:
        return cls(uid=data["uid"], device_id=int(data["deviceId"]), port=data["port"], mac=data["mac"],
                   ip=data.get("ip"), policy=SecurityGroupPolicy.model_validate(data["policy"]))


def guest_nics(uid: str, nics: Iterable[LaunchNic], port_of: t.Callable[[str, int], str]) -> list[GuestNic]:
    """The NICs of a launch that carry security groups."""
    return [GuestNic(uid=uid, device_id=nic.device_id, port=port_of(uid, nic.device_id), mac=nic.mac_address,
                     ip=nic.ip_address, policy=nic.security_groups)
            for nic in sorted(nics, key=lambda n: n.device_id) if nic.security_groups is not None]


# -- rendering --------------------------------------------------------------------------------


def _set(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _cidrs(rule: TrafficRule) -> list[str]:
    cidrs = []
    for cidr in rule.cidrs:
        network = ipaddress.ip_network(cidr, strict=False)
        if network.version != 4:
            continue  # the inet rules here are IPv4 only
        cidrs.append(str(network) if network.prefixlen < 32 else str(network.network_address))
    return cidrs


def rule_matches(rule: TrafficRule, remote: str) -> list[str] | None:
    """nft match expressions of ``rule`` with the remote address field ``remote`` (``saddr``/``daddr``);
    None when the rule can match nothing (only IPv6 CIDRs)."""
    parts = []
    if rule.cidrs:
        cidrs = _cidrs(rule)
        if not cidrs:
            return None
        parts.append(f"ip {remote} {_set(cidrs)}")
    protocol = (rule.protocol or "All").lower()
    if protocol in ("tcp", "udp"):
        if rule.port_start is not None:
            end = rule.port_end if rule.port_end is not None else rule.port_start
            ports = str(rule.port_start) if end == rule.port_start else f"{rule.port_start}-{end}"
            parts.append(f"{protocol} dport {ports}")
        else:
            parts.append(f"meta l4proto {protocol}")
    elif protocol == "icmp":
        if rule.icmp_type is not None and rule.icmp_type >= 0:
            parts.append(f"icmp type {rule.icmp_type}")
            if rule.icmp_code is not None and rule.icmp_code >= 0:
                parts.append(f"icmp code {rule.icmp_code}")
        else:
            parts.append("meta l4proto icmp")
    elif protocol not in ("all", "any", "-1"):
        parts.append(f"meta l4proto {protocol}")
    return parts


def _chain(name: str, lines: Iterable[str]) -> list[str]:
    return [f"\tchain {name} {{", *(f"\t\t{line}" for line in lines), "\t}"]


def render(nics: Iterable[GuestNic]) -> str:
    """The ``nft -f`` script replacing both tables with the rules of ``nics`` (every guest NIC of the host
    under security groups); with no NICs it only removes the tables."""
    nics = sorted(nics, key=lambda n: (n.uid, n.device_id))
    lines = [f"table inet {TABLE} {{}}", f"delete table inet {TABLE}",
             f"table bridge {TABLE} {{}}", f"delete table bridge {TABLE}"]
    if not nics:
        return "\n".join(lines) + "\n"
    addressed = [nic for nic in nics if nic.ip]
    chains: list[str] = []
    jumps_out: list[str] = []
    jumps_in: list[str] = []
    for nic in addressed:
        policy = nic.policy
        if policy.egress or not policy.egress_default_allow:
            allowed = [" ".join(m) + " return" for m in (rule_matches(r, "daddr") for r in policy.egress)
                       if m is not None]
            chains += _chain(f"egress-{nic.chain_id}", [*allowed, "drop"])
            jumps_out.append(f"ip saddr {nic.ip} jump egress-{nic.chain_id}")
        allowed = [" ".join(m) + " accept" for m in (rule_matches(r, "saddr") for r in policy.ingress) if m is not None]
        chains += _chain(f"ingress-{nic.chain_id}", [*allowed, "drop"])
        jumps_in.append(f"ip daddr {nic.ip} jump ingress-{nic.chain_id}")
    head = ["ct state established,related accept", *DHCP]
    inet = [f"table inet {TABLE} {{"]
    inet += _chain("forward", ["type filter hook forward priority filter; policy accept;", *head, *jumps_out,
                               *jumps_in])
    inet += _chain("input", ["type filter hook input priority filter; policy accept;", *head, *jumps_out])
    inet += _chain("output", ["type filter hook output priority filter; policy accept;", *head, *jumps_in])
    inet += chains
    inet.append("}")
    bridge = [f"table bridge {TABLE} {{"]
    spoof_jumps = [f'iifname "{nic.port}" jump spoof-{nic.chain_id}' for nic in nics]
    bridge += _chain("prerouting", ["type filter hook prerouting priority filter; policy accept;", *spoof_jumps])
    for nic in nics:
        rules = [f"ether saddr != {nic.mac} drop"]
        if nic.ip:
            rules += [f"arp saddr ip != {nic.ip} drop",
                      "ip saddr 0.0.0.0 udp sport 68 udp dport 67 return",
                      f"ip saddr != {nic.ip} drop"]
        bridge += _chain(f"spoof-{nic.chain_id}", rules)
    bridge.append("}")
    return "\n".join([*lines, *inet, *bridge]) + "\n"


# -- applying ---------------------------------------------------------------------------------


class SecurityGroupEnforcer:
    """The security groups of one host's guests: entries in files, the whole ruleset applied atomically."""

    def __init__(self, executor: Executor, state_dir: str, netns: str | None = None, timeout: float = 30.0) -> None:
        self.executor = executor
        self.netns = netns
        self.timeout = timeout
        self.root = os.path.join(state_dir, "sg", netns or "root")
        self._lock = asyncio.Lock()
        self._applied: str | None = None   # the script last applied by this process
        self._netfilter_ready = False

    def _argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    async def _run(self, argv: list[str], what: str) -> str:
        try:
            return check(await self.executor.run(self._argv(argv), timeout=self.timeout), what).stdout
        except CommandError as error:
            raise SecurityGroupError(str(error)) from None

    def _path(self, uid: str) -> str:
        return os.path.join(self.root, f"{uid}.json")

    def _read_all(self) -> list[GuestNic]:
        nics: list[GuestNic] = []
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return nics
        for name in names:
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.root, name)) as file:
                    nics += [GuestNic.from_json(entry) for entry in json.load(file)]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a torn file: that guest's next reconcile rewrites it
        return nics

    def _write(self, uid: str, nics: list[GuestNic]) -> bool:
        """Record ``uid``'s entry (none: remove it); whether it changed."""
        path = self._path(uid)
        text = json.dumps([nic.to_json() for nic in nics], sort_keys=True) if nics else None
        try:
            with open(path) as file:
                current: str | None = file.read()
        except FileNotFoundError:
            current = None
        if current == text:
            return False
        if text is None:
            os.unlink(path)
        else:
            os.makedirs(self.root, exist_ok=True)
            with open(path + ".tmp", "w") as file:
                file.write(text)
            os.replace(path + ".tmp", path)
        return True

    async def _ensure_br_netfilter(self) -> None:
        if self._netfilter_ready:
            return
        key = "net.bridge.bridge-nf-call-iptables"
        result = await self.executor.run(self._argv(["sysctl", "-qw", f"{key}=1"]), timeout=self.timeout)
        if result.returncode != 0:
            await self.executor.run(["modprobe", "br_netfilter"], timeout=self.timeout)
            result = await self.executor.run(self._argv(["sysctl", "-qw", f"{key}=1"]), timeout=self.timeout)
        if result.returncode != 0:
            raise SecurityGroupError("security groups need br_netfilter (bridge-nf-call-iptables) on the host, "
                                     f"and it is not available: {result.stderr.strip()}")
        self._netfilter_ready = True

    async def set_guest(self, uid: str, nics: list[GuestNic]) -> bool:
        """Enforce ``nics`` for guest ``uid`` (an empty list removes its rules); whether nft was run."""
        async with self._lock:
            if not nics and self._applied is not None and not os.path.exists(self._path(uid)):
                return False  # nothing recorded for it, and the tables are as this process left them
            changed = await asyncio.to_thread(self._write, uid, nics)
            script = render(await asyncio.to_thread(self._read_all))
            if not changed and script == self._applied:
                return False
            if nics:
                await self._ensure_br_netfilter()
            os.makedirs(self.root, exist_ok=True)
            path = os.path.join(self.root, "ruleset.nft")
            with open(path, "w") as file:
                file.write(script)
            await self._run(["nft", "-f", path], "nft")
            self._applied = script
            return True

    def has_guest(self, uid: str) -> bool:
        return os.path.exists(self._path(uid))

    async def remove_guest(self, uid: str) -> bool:
        return await self.set_guest(uid, [])

    async def guests(self) -> set[str]:
        return {nic.uid for nic in await asyncio.to_thread(self._read_all)}
