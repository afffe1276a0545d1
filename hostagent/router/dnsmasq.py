"""The router's dnsmasq: configuration and hosts files rendered from a :class:`VirtualRouterSpec` (pure: no I/O).

dnsmasq serves the guest network only (``interface=eth0``, ``bind-interfaces``, loopback excluded):

* DHCP: fixed leases only. ``dhcp-hostsfile`` lines ``mac,[set:nodefault,]ip,hostname``; a MAC not listed
  gets no answer (``dhcp-ignore=tag:!known``). The router option is ``spec.gateway`` and the DNS server
  the router's guest address, except for leases with ``default: false`` (a guest's other NICs): tagged
  ``nodefault``, they get empty router and DNS options, so the guest keeps its default route elsewhere.
  ``dhcp-authoritative``: after a restart dnsmasq answers renewals at once instead of waiting out clients.
  The lease file lives in the router's state directory, so leases survive a dnsmasq or agent restart.
* DNS: guest names from an ``addn-hosts`` file (``hostname`` and ``hostname.domain``), the domain answered
  locally, everything else forwarded to ``dnsServers``; no ``/etc/resolv.conf``, no ``/etc/hosts``.

Both hosts files are re-read on SIGHUP; the configuration file only on a restart. The agent records the
digests of what the running dnsmasq loaded (:meth:`Files.digests`), and :func:`change` says which of the two
a new rendering needs: nothing when nothing changed, so an agent restart never restarts dnsmasq.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import ipaddress
import os
import re
import typing as t

from controllers.api.v1alpha1.virtualrouter import VirtualRouterSpec

from . import GUEST_IFNAME

LEASE_SECONDS = 3600
NODEFAULT_TAG = "nodefault"
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_DOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$")


class DnsmasqConfigError(ValueError):
    """The spec cannot be served (malformed MAC or address); the message is fit for a status field."""


@dataclasses.dataclass(frozen=True)
class Paths:
    """The files of one router's dnsmasq, in its state directory."""

    directory: str

    @property
    def config(self) -> str:
        return os.path.join(self.directory, "dnsmasq.conf")

    @property
    def dhcp_hosts(self) -> str:
        return os.path.join(self.directory, "dhcp-hosts")

    @property
    def addn_hosts(self) -> str:
        return os.path.join(self.directory, "hosts")

    @property
    def leases(self) -> str:
        return os.path.join(self.directory, "dnsmasq.leases")

    @property
    def pidfile(self) -> str:
        return os.path.join(self.directory, "dnsmasq.pid")

    @property
    def log(self) -> str:
        return os.path.join(self.directory, "dnsmasq.log")


@dataclasses.dataclass(frozen=True)
class Files:
    """The rendered files: path → content."""

    config: str
    dhcp_hosts: str
    addn_hosts: str
    warnings: tuple[str, ...] = ()

    def by_path(self, paths: Paths) -> dict[str, str]:
        return {paths.config: self.config, paths.dhcp_hosts: self.dhcp_hosts, paths.addn_hosts: self.addn_hosts}

    def digests(self) -> dict[str, str]:
        """What a dnsmasq that read these files has loaded: the configuration (read at start) and the hosts
        files (read at start and on SIGHUP)."""
        def digest(*parts: str) -> str:
            return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
        return {"config": digest(self.config), "hosts": digest(self.dhcp_hosts, self.addn_hosts)}


class Change(enum.Enum):
    NONE = "none"
    RELOAD = "reload"     # hosts files only: SIGHUP
    RESTART = "restart"   # the configuration file: dnsmasq reads it only when it starts


def change(loaded: t.Mapping[str, t.Any] | None, wanted: Files) -> Change:
    """What a running dnsmasq needs to serve ``wanted``, given the digests of the files it ``loaded``
    (:meth:`Files.digests`; None when unknown)."""
    if not loaded:
        return Change.RESTART
    digests = wanted.digests()
    if loaded.get("config") != digests["config"]:
        return Change.RESTART
    if loaded.get("hosts") != digests["hosts"]:
        return Change.RELOAD
    return Change.NONE


def needed(spec: VirtualRouterSpec) -> bool:
    """Whether the router runs dnsmasq at all."""
    return spec.dhcp or spec.dns


def render(spec: VirtualRouterSpec, paths: Paths, *, interface: str = GUEST_IFNAME,
           lease_seconds: int = LEASE_SECONDS) -> Files:
    """dnsmasq's files for ``spec``. Raises :class:`DnsmasqConfigError`."""
    warnings: list[str] = []
    try:
        guest = ipaddress.IPv4Interface(spec.guest.addresses[0])
    except (IndexError, ValueError):
        raise DnsmasqConfigError(f"guest interface address {spec.guest.addresses[:1]} is not IPv4 CIDR notation") \
            from None
    domain = spec.domain.lower().rstrip(".")
    if not _DOMAIN.match(domain):
        raise DnsmasqConfigError(f"domain {spec.domain!r} is not a DNS domain name")
    lines = [
        f"# Cumulo virtual router of network {spec.network}: generated by the host agent, rewritten on change.",
        f"pid-file={paths.pidfile}",
        "# The hosts files live in the agent's private state directory: dnsmasq keeps root to re-read them.",
        "user=root",
        f"interface={interface}",
        "except-interface=lo",
        "bind-interfaces",
        "no-resolv",
        "no-hosts",
        f"log-facility={paths.log}",
    ]
    if spec.dns:
        lines += [f"domain={domain}", f"local=/{domain}/", "domain-needed", "bogus-priv",
                  f"addn-hosts={paths.addn_hosts}"]
        for server in spec.dns_servers:
            lines.append(f"server={_address(server, 'dnsServers')}")
    else:
        lines.append("port=0")
    if spec.dhcp:
        lines += [
            f"dhcp-range={guest.network.network_address},static,{guest.network.netmask},{lease_seconds}",
            f"dhcp-hostsfile={paths.dhcp_hosts}",
            f"dhcp-leasefile={paths.leases}",
            "dhcp-authoritative",
            "dhcp-ignore=tag:!known",
        ]
        if not spec.dns:
            lines.append(f"domain={domain}")
        router = _address(spec.gateway, "gateway") if spec.gateway else None
        dns = [str(guest.ip)] if spec.dns else [_address(server, "dnsServers") for server in spec.dns_servers]
        # Untagged, dnsmasq would offer itself as router and DNS server: every option is explicit.
        lines.append(f"dhcp-option=tag:!{NODEFAULT_TAG},option:router" + (f",{router}" if router else ""))
        lines.append(f"dhcp-option=tag:!{NODEFAULT_TAG},option:dns-server" + "".join(f",{d}" for d in dns))
        lines.append(f"dhcp-option=tag:{NODEFAULT_TAG},option:router")
        lines.append(f"dhcp-option=tag:{NODEFAULT_TAG},option:dns-server")
        if spec.guest.segment.mtu != 1500:
            lines.append(f"dhcp-option=option:mtu,{spec.guest.segment.mtu}")
    dhcp_hosts, addn_hosts = [], []
    for lease in spec.leases:
        mac = lease.mac_address.lower()
        if not _MAC.match(mac):
            raise DnsmasqConfigError(f"lease MAC address {lease.mac_address!r} is malformed")
        ip = _address(lease.ip_address, f"lease of {mac}")
        if ipaddress.IPv4Address(ip) not in guest.network:
            raise DnsmasqConfigError(f"lease address {ip} of {mac} is outside the guest network {guest.network}")
        hostname = lease.hostname.lower()
        if not _LABEL.match(hostname):
            warnings.append(f"lease of {mac}: host name {lease.hostname!r} is not a DNS label; served by address only")
            hostname = ""
        fields = [mac, *([f"set:{NODEFAULT_TAG}"] if not lease.default else []), ip, *([hostname] if hostname else [])]
        dhcp_hosts.append(",".join(fields))
        if hostname:
            addn_hosts.append(f"{ip} {hostname}.{domain} {hostname}")
    return Files(
        config="\n".join(lines) + "\n",
        dhcp_hosts="".join(f"{line}\n" for line in dhcp_hosts),
        addn_hosts="".join(f"{line}\n" for line in addn_hosts),
        warnings=tuple(warnings),
    )


def _address(value: str, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise DnsmasqConfigError(f"{what}: {value!r} is not an IPv4 address") from None
