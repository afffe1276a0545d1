"""The virtual router of a guest network (CloudStack's router system VM), run by a host's agent as a network
namespace.

Layout on a host (all names derived from the Network's uid, so an agent restart finds everything again)::

    host network namespace (AgentConfig.host_netns, or the agent's own)
      guest segment bridge ── vrg<uid6> ══ veth ══ eth0  ┐  router netns <host_netns or 'cumulo'>-vr-<uid8>:
      public segment bridge ── vrp<uid6> ══ veth ══ eth1  ┘  dnsmasq (DHCP, DNS), nftables table ``ip cumulo``

Files: ``<state_dir>/routers/<networkUid>/`` holds the owner record (``router.json``: which VirtualRouter and
which segments, so a router whose object is gone can still be unplugged), the dnsmasq config, hosts files,
lease file and pidfile, and the last nftables ruleset loaded.

Modules: :mod:`.nftables` and :mod:`.dnsmasq` render configuration (pure); :mod:`.links` is the netlink part
(pyroute2); :mod:`.runtime` applies a spec and tears a router down.
"""

from __future__ import annotations

GUEST_IFNAME = "eth0"
PUBLIC_IFNAME = "eth1"
NETNS_INFIX = "-vr-"


def netns_prefix(host_netns: str | None) -> str:
    """Every router namespace of a host starts with this (netns names are machine-global, and simulated hosts
    share one machine)."""
    return f"{host_netns or 'cumulo'}{NETNS_INFIX}"


def netns_name(host_netns: str | None, network_uid: str) -> str:
    return f"{netns_prefix(host_netns)}{network_uid[:8]}"


def host_veths(network_uid: str) -> tuple[str, str]:
    """Host-side names of the guest and public veths (within Linux's 15 characters)."""
    short = network_uid[:6]
    return f"vrg{short}", f"vrp{short}"
